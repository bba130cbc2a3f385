"""The scheduler alone (no model): a simulated KV cache records what each slot holds (a token's K/V depends
on the token and everything before it), so every step can check that each running sequence's blocks hold
exactly its own context, through chunked prefill, prefix
caching, forks with copy-on-write and preemption; and that the pool is whole when everything has ended."""

from __future__ import annotations

import random

import pytest

from decoding.cache import BlockPool, blocks_for
from decoding.errors import InvalidRequest
from decoding.scheduler import Scheduler, SchedulerConfig

BS = 4


class Seq:
    """What the scheduler reads and writes of a decoding.sequence.Sequence."""

    def __init__(self, prompt: list[int], budget: int) -> None:
        self.prompt_ids, self.output_ids, self.budget = prompt, [], budget
        self.blocks, self.chain, self.forks = [], [], []
        self.num_computed, self.decoding, self.running, self.order, self.scheduled_step = 0, False, False, 0, -1
        self.pending, self.future = 0, []  # tokens drawn, not read yet (the scheduler zeroes pending to drop them)

    @property
    def num_known(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_tokens(self) -> int:
        return self.num_known + self.pending

    def token_slice(self, start: int, stop: int) -> list[int]:
        return (self.prompt_ids + self.output_ids + [-1] * self.pending)[start:stop]

    def true_slice(self, start: int, stop: int) -> list[int]:
        """What the device has: pending tokens included."""
        return (self.prompt_ids + self.output_ids + self.future)[start:stop]


def check_kv(kv: dict, seqs: list[Seq]) -> None:
    for s in seqs:
        assert len(s.blocks) == blocks_for(s.num_computed, BS)
        held = [kv.get((s.blocks[p // BS], p % BS)) for p in range(s.num_computed)]
        assert held == [tuple(s.true_slice(0, p + 1)) for p in range(s.num_computed)]


def check_refcounts(pool: BlockPool, seqs: list[Seq]) -> None:
    expected = [0] * pool.num_blocks
    for s in seqs:
        for b in s.blocks:
            expected[b] += 1
    assert [pool.refcount(b) for b in range(pool.num_blocks)] == expected
    assert pool.num_free == sum(1 for e in expected if e == 0)


def simulate(rng: random.Random, config: SchedulerConfig, num_blocks: int, num_requests: int,
             overlap: bool = False) -> Scheduler:
    """A random workload through the scheduler, checking the KV it implies after every step. With overlap
    (as the engine runs on a GPU), the tokens a step draws are read only after the next step is scheduled."""
    pool = BlockPool(num_blocks)
    drawn: list[Seq] = []  # the sequences that drew a token last step, not read yet
    sched = Scheduler(config, pool, BS)
    kv: dict[tuple[int, int], tuple] = {}  # (block, offset) -> the tokens up to the one whose K/V it holds
    # Few distinct token ids, so equal blocks often follow different prefixes (which must not share K/V).
    prefixes = [[rng.randrange(3) for _ in range(rng.randint(1, 12))] for _ in range(4)]
    requests, submitted = [], 0
    for _ in range(100_000):
        if submitted < num_requests and rng.random() < 0.4:  # arrivals: often a shared prefix
            prompt = rng.choice(prefixes)[:] + [rng.randrange(3) for _ in range(rng.randint(0, 6))]
            budget, n = rng.randint(1, 12), rng.choice([1, 1, 1, 2, 3])
            if sched.blocks_needed(len(prompt), budget, n) <= num_blocks and n <= config.max_num_seqs:
                seqs = [Seq(prompt, budget) for _ in range(n)]
                seqs[0].forks = seqs[1:]
                sched.add(seqs[0])
                requests.append(seqs)
            submitted += 1
        if requests and rng.random() < 0.02:  # a cancellation
            seqs = requests.pop(rng.randrange(len(requests)))
            sched.finish(seqs)
        if not sched.has_work:
            if submitted >= num_requests:
                break
            continue
        out = sched.schedule()
        for s in out.preempted:
            assert s.pending == 0
            s.future = []  # a preempted sequence's drawn token is dropped, and drawn again after the recompute
        assert out.scheduled or out.preempted or drawn
        assert sum(it.num_tokens for it in out.scheduled) <= config.max_num_batched_tokens
        for it in out.scheduled:  # the step writes the new tokens' K/V
            s = it.seq
            assert s.pending <= 1 and -1 not in s.token_slice(s.num_computed, s.num_computed + it.num_tokens)[:-1]
            for p in range(s.num_computed, s.num_computed + it.num_tokens):
                kv[(s.blocks[p // BS], p % BS)] = tuple(s.true_slice(0, p + 1))
            for fork, dst in it.forks:  # copy-on-write of the partial last prompt block
                if dst is not None:
                    src = s.blocks[s.num_tokens // BS]
                    for off in range(BS):
                        kv[(dst, off)] = kv.get((src, off))
        sched.step_done(out)
        assert len(sched.running) <= config.max_num_seqs
        # in the step: the scheduled sequences, and candidates forked off them (they draw from its logits)
        scheduled = {id(s) for it in out.scheduled for s in [it.seq] + [fork for fork, _ in it.forks]}
        new_drawn = []
        for s in sched.running:
            if s.decoding:
                if not overlap:  # every decoding sequence was scheduled
                    assert id(s) in scheduled
                if id(s) in scheduled:  # it draws a token now
                    assert s.num_computed == s.num_tokens
                    s.future.append(hash((tuple(s.prompt_ids), len(s.output_ids) + s.pending, id(s) % 3)) % 3)
                    s.pending += 1
                    new_drawn.append(s)
        if not overlap:
            drawn, new_drawn = new_drawn, []
        done = []
        for s in drawn:  # the host reads the tokens of the step before (this step's, without overlap)
            if s.pending == 0:  # cancelled, finished or preempted since: its token is dropped
                continue
            s.pending -= 1
            s.output_ids.append(s.future.pop(0))
            if len(s.output_ids) == s.budget:
                done.append(s)
        drawn = new_drawn
        sched.finish(done)
        for s in done:
            s.future = []
        live = sched.running
        check_kv(kv, live)
        check_refcounts(pool, live)
        requests = [r for r in requests if any(s.running or s in sched.waiting for s in r)]
    assert not sched.has_work
    assert pool.num_free == num_blocks and all(pool.refcount(b) == 0 for b in range(num_blocks))
    return sched


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
@pytest.mark.parametrize("seed", range(12))
def test_random_workload_keeps_kv_consistent_and_pool_whole(seed, overlap):
    rng = random.Random(seed)
    config = SchedulerConfig(max_num_batched_tokens=rng.choice([8, 12, 32]), max_num_seqs=rng.choice([2, 4, 8]),
                             enable_prefix_caching=seed % 3 != 2, watermark=rng.choice([0.0, 0.1]),
                             static_batch_size=4 if seed % 6 == 5 else None,
                             context_cost=0.3 if seed % 4 == 1 else 0.0)
    sched = simulate(rng, config, num_blocks=rng.choice([7, 9, 12]), num_requests=200, overlap=overlap)
    if config.enable_prefix_caching:
        assert sched.prefix_hit_tokens > 0
    if not overlap:  # (with overlap the same seeds make other workloads: see the test below)
        assert sched.num_preemptions > 0 or seed % 6 == 5
    PREEMPTIONS[overlap] = PREEMPTIONS.get(overlap, 0) + sched.num_preemptions


PREEMPTIONS: dict = {}


def test_random_workloads_with_overlap_preempted():
    """The overlapped runs above preempted sequences too (some with a drawn, unread token)."""
    if True not in PREEMPTIONS:
        pytest.skip("run with the workload tests")
    assert PREEMPTIONS[True] > 0


def test_config_is_checked():
    with pytest.raises(InvalidRequest, match="max_num_batched_tokens \\(8\\) must be >= max_num_seqs \\(16\\)"):
        SchedulerConfig(max_num_batched_tokens=8, max_num_seqs=16)
    with pytest.raises(InvalidRequest, match="gpu_memory_utilization must be in \\(0, 1\\]"):
        SchedulerConfig(gpu_memory_utilization=1.5)
    assert SchedulerConfig(max_num_batched_tokens=32).max_num_seqs == 32


def _run_step(sched: Scheduler):
    """One step without overlap: the decoding sequences scheduled draw a token, read at once."""
    out = sched.schedule()
    sched.step_done(out)
    for it in out.scheduled:
        if it.seq.decoding:
            it.seq.output_ids.append(1)
    return out


def _two_decoding(context_cost: float) -> tuple[Scheduler, SchedulerConfig, Seq, Seq]:
    """Two sequences decoding with contexts of 100 and 300 tokens, under a 64-token budget from now on."""
    config = SchedulerConfig(max_num_batched_tokens=512, max_num_seqs=8, context_cost=context_cost,
                             enable_prefix_caching=False)
    sched = Scheduler(config, BlockPool(400), BS)
    a, b = Seq([1] * 100, 50), Seq([2] * 300, 50)
    sched.add(a)
    sched.add(b)
    _run_step(sched)  # both prompts in one step; each draws its first token
    assert a.decoding and b.decoding and (a.num_computed, b.num_computed) == (100, 300)
    config.max_num_batched_tokens = 64
    return sched, config, a, b


@pytest.mark.parametrize("context_cost", [0.0, 0.1])
def test_context_cost_charges_decode_rows_their_context(context_cost):
    """Decode rows over contexts of 100 and 300 tokens cost 2 (context_cost 0) or 2 + 0.1 x 400 = 42 of the
    64-token budget: a waiting prompt gets the rest as its first chunk, 62 or 22 tokens."""
    sched, _, a, b = _two_decoding(context_cost)
    c = Seq([3] * 200, 10)
    sched.add(c)
    out = _run_step(sched)
    tokens = {id(it.seq): it.num_tokens for it in out.scheduled}
    assert tokens == {id(a): 1, id(b): 1, id(c): 62 if context_cost == 0 else 22}


def test_decodes_over_budget_still_run_and_block_admissions():
    """When the decode rows alone cost more than the budget (1 + 1.0 x context each), they all still run
    (a running sequence never stalls for cost), nothing is preempted for it, and no prompt is admitted
    until they finish."""
    sched, _, a, b = _two_decoding(1.0)
    c = Seq([3] * 20, 4)
    sched.add(c)
    for _ in range(3):
        out = _run_step(sched)
        assert [it.seq for it in out.scheduled] == [a, b] and not out.preempted
        assert list(sched.waiting) == [c] and not c.running
    sched.finish([a, b])
    out = _run_step(sched)
    assert [(it.seq, it.num_tokens) for it in out.scheduled] == [(c, 20)]


def test_context_cost_is_checked():
    for bad in (-0.1, float("inf"), "0.1", True):
        with pytest.raises(InvalidRequest, match="context_cost must be a number >= 0"):
            SchedulerConfig(context_cost=bad)
