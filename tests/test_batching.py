"""Batched decoding over different caches (kvzip_rag.batch) and the continuous-batching scheduler
(kvzip_rag.scheduler): each sequence gets its batch-1 logits and answers; no cross-talk between requests."""

from __future__ import annotations

import pytest
import torch

import kvzip_rag
from kvzip_rag import attention
from kvzip_rag.batch import batched_forward
from kvzip_rag.cache import packed_fresh
from kvzip_rag.compose import compose
from kvzip_rag.evidence import EvidenceRecorder
from kvzip_rag.generate import packed_forward
from kvzip_rag.quant import quantize

from conftest import build_tiny
from test_engine import ATOL, TEXT
from test_cli import tiny_model_dir  # noqa: F401  (fixture)
from test_packed_attention import reference_flash_attn_varlen_func

OTHER = ("The Orlen valley railway opened in 1884 and climbs 900 metres in eleven kilometres. Its steepest part uses a "
         "rack, and the trains are pushed, never pulled, by small green locomotives built in Winterthur.")
QUESTIONS = ["Who built the harbour?", "When did the railway open?", "What colour is the lighthouse?"]
PROMPTS = QUESTIONS + ["Why?", "And the locomotives, where were they built?"]  # one per varied cache
STEPS = kvzip_rag.PackedLayer.MIN_ROOM + 4  # past the first reserved room: every tail regrows mid-batch


def varied_caches(model: kvzip_rag.KVzipModel) -> list[kvzip_rag.PackedCache]:
    """Caches of different shapes and lengths: compressed (unequal head budgets), whole, composed of two,
    quantized, and one of a two-word document at a low ratio (hardly more than the template)."""
    compressed = kvzip_rag.compress(model, " ".join([TEXT] * 2), ratio=0.3)
    whole = kvzip_rag.compress(model, OTHER, ratio=1.0)
    composed = compose(model, [kvzip_rag.compress(model, TEXT, ratio=0.5), kvzip_rag.compress(model, OTHER, ratio=0.5)])
    quantized = quantize(kvzip_rag.compress(model, OTHER, ratio=0.6), 8).dequantize()
    tiny = kvzip_rag.compress(model, "Hello there.", ratio=0.2)
    return [compressed, whole, composed, quantized, tiny]


def count_calls(monkeypatch, name: str, module=attention) -> list[int]:
    """Count the calls of ``module.name`` (still calling it)."""
    calls, original = [], getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def serial_logits(model, caches, prompts, steps: int) -> list[torch.Tensor]:
    """Reference: each cache alone, its prompt then ``steps`` greedy tokens, batch size 1."""
    out = []
    with torch.inference_mode():
        for cache, prompt in zip(caches, prompts):
            rows = [packed_forward(model, cache, prompt)]
            for _ in range(steps):
                rows.append(packed_forward(model, cache, [int(rows[-1].argmax())]))
            out.append(torch.stack(rows))
            cache.reset()
    return out


def batched_logits(model, caches, prompts, steps: int) -> list[torch.Tensor]:
    """The prompts prefilled together (one forward pass over their different caches), then ``steps`` batched
    greedy steps over all the caches at once."""
    with torch.inference_mode():
        rows = [batched_forward(model, caches, prompts)]
        for _ in range(steps):
            rows.append(batched_forward(model, caches, [[int(r.argmax())] for r in rows[-1]]))
    for cache in caches:
        cache.reset()
    return list(torch.stack(rows, 1))


def mixed_logits(model, caches, prompts, steps: int) -> list[torch.Tensor]:
    """The first two prompts prefilled together; then each pass decodes the running answers while the next
    waiting prompt is prefilled beside them (as the scheduler admits a request mid-batch)."""
    rows: list[list[torch.Tensor]] = [[] for _ in caches]
    with torch.inference_mode():
        for b, row in zip((0, 1), batched_forward(model, caches[:2], prompts[:2])):
            rows[b].append(row)
        admitted = 2
        while any(len(r) <= steps for r in rows):
            running = [b for b in range(admitted) if len(rows[b]) <= steps]
            joining = list(range(admitted, min(admitted + 1, len(caches))))
            out = batched_forward(model, [caches[b] for b in running + joining],
                                  [[int(rows[b][-1].argmax())] for b in running] + [prompts[b] for b in joining])
            for b, row in zip(running + joining, out):
                rows[b].append(row)
            admitted += len(joining)
    for cache in caches:
        cache.reset()
    return [torch.stack(r) for r in rows]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_batched_decoding_gives_each_sequence_its_batch_one_logits(family, smol_tokenizer, monkeypatch):
    """Every layer of every pass attends over all five caches in one call (their shared arena), yet each
    sequence reads only its own cache: its logits are its batch-1 logits, step after step (past a regrowth)."""
    model = build_tiny(family, smol_tokenizer, seed=5)
    caches = varied_caches(model)
    prompts = [model.encode(model.template.question_text(q)) for q in PROMPTS]
    expected = serial_logits(model, caches, prompts, STEPS)
    one_call = count_calls(monkeypatch, "torch_batched_attention")
    got = batched_logits(model, caches, prompts, STEPS)
    assert len(one_call) == (STEPS + 1) * len(caches[0].layers)
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, atol=ATOL), (g - e).abs().max()
    assert not torch.allclose(got[0], got[1], atol=ATOL)  # the sequences really differ


@pytest.mark.parametrize("grid", [True, False], ids=["one-padded-call", "prompt-by-prompt"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_batched_prefill_gives_each_question_its_batch_one_logits(family, grid, smol_tokenizer, monkeypatch):
    """Questions of different lengths prefilled in one pass over different caches (compressed, whole, composed,
    quantized), alone or beside answers that are decoding: each gets the logits of its batch-1 prefill, whether
    the prompts attend in one padded call or (a grid over ``PROMPT_GRID_ELEMENTS``) each over its own cache."""
    if not grid:
        monkeypatch.setattr(attention, "PROMPT_GRID_ELEMENTS", 0)
    padded = count_calls(monkeypatch, "prompt_grid_attention")
    model = build_tiny(family, smol_tokenizer, seed=7)
    caches = varied_caches(model)
    prompts = [model.encode(model.template.question_text(q)) for q in PROMPTS]
    assert len({len(p) for p in prompts}) > 1
    expected = serial_logits(model, caches, prompts, 3)
    with torch.inference_mode():
        prefilled = batched_forward(model, caches, prompts)
        tails = [cache.tail_length for cache in caches]
    assert tails == [len(p) for p in prompts]  # each cache took its own prompt, no padding
    for row, e in zip(prefilled, expected):
        assert torch.allclose(row, e[0], atol=ATOL), (row - e[0]).abs().max()
    for cache in caches:
        cache.reset()
    for g, e in zip(mixed_logits(model, caches, prompts, 3), expected):
        assert torch.allclose(g, e, atol=ATOL), (g - e).abs().max()
    assert bool(padded) == grid


def test_flash_path_in_a_batch_matches_the_torch_path(smol_tokenizer, monkeypatch):
    """The CUDA code path (one flash_attn_varlen_func call per layer over all sequences' (sequence, head)
    segments of the arena) run on CPU with the reference kernel gives each sequence its batch-1 logits, prompts
    prefilled beside answers decoding included; one kernel call per layer and pass."""
    model = build_tiny("gemma3", smol_tokenizer, seed=2)
    caches = varied_caches(model)
    prompts = [model.encode(model.template.question_text(q)) for q in PROMPTS]
    expected = serial_logits(model, caches, prompts, 6)
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return reference_flash_attn_varlen_func(*args, **kwargs)

    monkeypatch.setattr(attention, "use_flash", lambda query: True)
    monkeypatch.setattr(attention, "_flash_varlen", lambda: spy)
    got = batched_logits(model, caches, prompts, 6)
    assert len(calls) == 7 * len(caches[0].layers)
    for g, e in zip(got + mixed_logits(model, caches, prompts, 6), expected + expected):
        assert torch.allclose(g, e, atol=ATOL), (g - e).abs().max()


@pytest.mark.parametrize("flash", [False, True])
def test_evidence_recorded_in_a_batch_is_each_sequences_own(smol_tokenizer, monkeypatch, flash):
    """Where each answer attends (``EvidenceRecorder``, read from the batched softmax, or beside the flash call)
    is what it records alone: prompts prefilled together, then decoding steps."""
    model = build_tiny("llama", smol_tokenizer, seed=4)
    caches = varied_caches(model)
    prompts = [model.encode(model.template.question_text(q)) for q in PROMPTS]

    def evidence(run) -> list[torch.Tensor]:
        recorders = [EvidenceRecorder(cache) for cache in caches]
        run(model, caches, prompts, 5)
        return [torch.cat(recorder.finish().token_mass) for recorder in recorders]

    alone = evidence(serial_logits)
    if flash:
        monkeypatch.setattr(attention, "use_flash", lambda query: True)
        monkeypatch.setattr(attention, "_flash_varlen", lambda: reference_flash_attn_varlen_func)
    for got, expected in zip(evidence(batched_logits), alone):
        assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


@pytest.mark.parametrize("flash", [False, True])
def test_a_batch_keeps_its_arena_as_members_come_and_go_and_bounds_its_padding(tiny_llama, monkeypatch, flash):
    """Steps of the same sequences reuse their layers' arena (no copy per step); a sequence that leaves gives back
    its slot and one that joins takes it, copying only itself (no rebuild), the sequences then out of slot order;
    a tail that outgrows its room or a joining cache that fits no slot gets a new arena; each sequence's logits
    stay its batch-1 logits throughout (also on the CUDA path, run with the reference kernel). A cache that would
    make the arena mostly padding sends the layer part by part, with the same logits."""
    if flash:
        monkeypatch.setattr(attention, "use_flash", lambda query: True)
        monkeypatch.setattr(attention, "_flash_varlen", lambda: reference_flash_attn_varlen_func)
    caches = varied_caches(tiny_llama)[:4]
    alone = [packed_fresh(cache) for cache in caches]  # the same tokens, never batched
    prompts = [tiny_llama.encode(tiny_llama.template.question_text(q)) for q in PROMPTS[:4]]
    built = count_calls(monkeypatch, "__init__", kvzip_rag.cache.LayerArena)

    def step(members: list[int], tokens: list[list[int]]) -> None:
        got = batched_forward(tiny_llama, [caches[b] for b in members], tokens)
        for b, ids, row in zip(members, tokens, got):
            expected = packed_forward(tiny_llama, alone[b], ids)
            assert torch.allclose(row, expected, atol=ATOL), (b, (row - expected).abs().max())

    with torch.inference_mode():
        step([0, 1, 2], prompts[:3])
        arena = caches[0].layers[0].arena_slot[0]
        assert [c.layers[0].arena_slot for c in caches[:3]] == [(arena, 0), (arena, 1), (arena, 2)]
        rebuilds = len(built)
        step([0, 1, 2], [[1]] * 3)
        caches[1].leave_arena()  # leaves: its tail kept, in a buffer of its own; its slot free
        layer = caches[1].layers[0]
        assert layer.arena_slot is None and layer.buffer_keys.untyped_storage().nbytes() == layer.buffer_keys.nbytes
        assert arena.taken == [True, False, True]
        step([2, 0], [[5], [3]])  # out of slot order, a free slot between
        assert len(built) == rebuilds and caches[2].layers[0].arena_slot == (arena, 2)
        step([3, 2, 0], [prompts[3], [4], [1]])  # joins into the free slot
        assert len(built) == rebuilds and caches[3].layers[0].arena_slot == (arena, 1)
        assert torch.allclose(packed_forward(tiny_llama, caches[1], [7]), packed_forward(tiny_llama, alone[1], [7]),
                              atol=ATOL)
        room = caches[0].layers[0].room
        step([0, 3], [[1] * room, [2]])  # regrows the first cache's tails: it no longer fits its slot
        assert caches[0].layers[0].room > room and caches[0].layers[0].arena_slot[0] is not arena
    for cache in caches:
        cache.reset()
    small = varied_caches(tiny_llama)[4]
    mixed = [kvzip_rag.compress(tiny_llama, " ".join([TEXT] * 12), ratio=1.0)] + [packed_fresh(small) for _ in range(5)]
    assert not kvzip_rag.cache.use_arena([cache.layers[0] for cache in mixed])
    prompts = [tiny_llama.encode(tiny_llama.template.question_text(q)) for q in QUESTIONS * 2]
    expected = serial_logits(tiny_llama, mixed, prompts, 3)
    for g, e in zip(batched_logits(tiny_llama, mixed, prompts, 3), expected):
        assert torch.allclose(g, e, atol=ATOL), (g - e).abs().max()
    assert all(cache.layers[0].arena_slot is None for cache in mixed)


def test_a_batched_pass_leaves_each_cache_the_row_meta_it_would_build_alone(tiny_llama):
    """The arena writes every sequence's new rows from their positions in one indexed copy per layer (keys,
    values, positions, decode mask); afterwards each cache's row meta, a view of its slot, equals the meta it
    builds from scratch (the plain reference), out of slot order and after a prompt beside decoding answers."""
    caches = varied_caches(tiny_llama)[:4]
    prompts = [tiny_llama.encode(tiny_llama.template.question_text(q)) for q in PROMPTS[:4]]
    heads = tiny_llama.config.num_attention_heads
    with torch.inference_mode():
        batched_forward(tiny_llama, caches[:3], prompts[:3])
        caches[0].leave_arena()  # a free slot: the next one joins there, out of slot order
        batched_forward(tiny_llama, [caches[2], caches[3], caches[1]], [[4], prompts[3], [9]])
        batched_forward(tiny_llama, [caches[2], caches[3], caches[1]], [[6], [2], [3]])
    assert caches[3].layers[0].arena_slot[1] == 0
    for cache in caches[1:]:
        for layer in cache.layers:
            written = layer.row_meta(heads)
            got = (written.heads.clone(), written.positions.clone(), written.decode_bias.clone())
            layer._row_meta = None
            alone = layer.row_meta(heads)
            assert torch.equal(got[0], alone.heads) and torch.equal(got[1], alone.positions)
            assert torch.equal(got[2], alone.decode_bias)


def test_a_batch_needs_tokens_for_each_cache(tiny_llama):
    cache = kvzip_rag.compress(tiny_llama, TEXT, ratio=0.5)
    with pytest.raises(kvzip_rag.errors.InvalidArgumentError, match="one token list per cache"):
        batched_forward(tiny_llama, [cache], [[1], [2]])
    with pytest.raises(kvzip_rag.errors.InvalidArgumentError, match="at least one token"):
        batched_forward(tiny_llama, [cache], [[]])


# ---------------------------------------------------------------------------------------------- the scheduler

PLACES = ["Arvik", "Belmora", "Corrin", "Dunhal", "Esker", "Falby", "Gorran", "Hesket", "Illow", "Jarnby", "Kessel",
          "Lorne", "Marrow", "Nesbit", "Orrin", "Pellow"]
FOUNDERS = ["Ada Roth", "Bram Voss", "Cora Lind", "Dag Moen", "Eli Stark", "Fay Holt", "Gus Berg", "Hal Dunn",
            "Ivy Kerr", "Jon Alm", "Kai Brun", "Lea Sund", "Max Ekel", "Nia Falk", "Olaf Ring", "Pia Tor"]
DOCS = {place.lower(): f"The town of {place} was founded in {1700 + 7 * i} by {founder}. Its market sells "
                       f"{['rye', 'salt', 'wool', 'tin'][i % 4]} every {['Monday', 'Friday'][i % 2]}."
        for i, (place, founder) in enumerate(zip(PLACES, FOUNDERS))}
ASKED = [(f"Who founded the town of {place}?", place.lower()) for place in PLACES]
LONG = dict(clean=False, max_new_tokens=12, evidence=False)  # random weights: long answers keep the batch full


def options_for(i: int) -> dict:
    """Per-request sampling: even requests greedy, odd ones sampled with their own seed."""
    return dict(LONG) if i % 2 == 0 else dict(LONG, temperature=0.9, top_k=50, seed=i)


@pytest.fixture(scope="module")
def stored(tiny_llama, tmp_path_factory):
    from conftest import service_over

    return service_over(tiny_llama, tmp_path_factory.mktemp("batch-store"), DOCS, ratio=0.5).store


@pytest.fixture(scope="module")
def serial(stored, tiny_llama):
    """Every question answered one at a time by the unbatched service: the reference."""
    from kvzip_rag.qa import QAService

    service = QAService(stored, tiny_llama)
    return [service.answer(q, **options_for(i)) for i, (q, _) in enumerate(ASKED)]


def same_answer(got, expected, doc_id: str) -> None:
    assert got.text == expected.text
    assert got.answers[0].answer.token_ids == expected.answers[0].answer.token_ids
    assert got.answers[0].answer.finish_reason == expected.answers[0].answer.finish_reason
    assert [t.doc_id for t in got.used] == [t.doc_id for t in expected.used] == [doc_id]


def test_threads_decode_together_and_each_gets_its_serial_answer(stored, tiny_llama, serial):
    from concurrent.futures import ThreadPoolExecutor

    from kvzip_rag.qa import QAService

    service = QAService(stored, tiny_llama, batching=True)
    with ThreadPoolExecutor(len(ASKED)) as pool:
        got = list(pool.map(lambda i: service.answer(ASKED[i][0], **options_for(i)), range(len(ASKED))))
    for i, (result, (_, doc_id)) in enumerate(zip(got, ASKED)):
        same_answer(result, serial[i], doc_id)
    assert service.scheduler.peak_batch > 1  # they did decode together
    assert service.scheduler.running == service.scheduler.waiting == 0


def test_a_batched_answer_is_finished_without_the_model_lock(stored, tiny_llama, serial, monkeypatch):
    """Its evidence is read and its result built without the lock: had the answer to take it back after its last
    piece, it would wait out the next step while its place in the batch stood empty."""
    from kvzip_rag import abstain
    from kvzip_rag.qa import QAService

    service = QAService(stored, tiny_llama, batching=True)
    held: list[bool] = []
    ground = abstain.ground
    monkeypatch.setattr(abstain, "ground", lambda *a: held.append(service.lock._is_owned()) or ground(*a))
    for k, compose in ((1, "parallel"), (2, "parallel"), (2, "best-of-k")):
        result = service.answer(ASKED[0][0], k, compose=compose, **dict(options_for(0), evidence=True))
        assert result.best.answer.evidence is not None and result.evidence_score is not None  # grounded all the same
    assert held == [False, False, False]
    same_answer(service.answer(ASKED[0][0], **options_for(0)), serial[0], ASKED[0][1])


def test_coroutines_decode_together_and_each_gets_its_serial_answer(stored, tiny_llama, serial):
    import asyncio

    from kvzip_rag.qa import QAService

    service = QAService(stored, tiny_llama, batching=True)

    async def streamed(i: int):
        stream = service.stream(ASKED[i][0], **options_for(i))
        pieces = [piece async for piece in stream]
        assert "".join(pieces).strip() == stream.result.text
        return stream.result

    async def main():
        return await asyncio.gather(*(service.aanswer(q, **options_for(i)) if i % 2 else streamed(i)
                                      for i, (q, _) in enumerate(ASKED)))

    for i, (result, (_, doc_id)) in enumerate(zip(asyncio.run(main()), ASKED)):
        same_answer(result, serial[i], doc_id)
    assert service.scheduler.peak_batch > 1


def test_stop_strings_are_per_request(stored, tiny_llama, serial):
    from concurrent.futures import ThreadPoolExecutor

    from kvzip_rag.qa import QAService

    text = serial[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip()
    service = QAService(stored, tiny_llama, batching=True)
    with ThreadPoolExecutor(2) as pool:
        cut = pool.submit(service.answer, ASKED[0][0], **dict(options_for(0), stop=[stop]))
        whole = pool.submit(service.answer, ASKED[2][0], **options_for(2))
    assert cut.result().text == text[: text.find(stop)].strip()
    assert cut.result().answers[0].answer.finish_reason == "stop"
    same_answer(whole.result(), serial[2], ASKED[2][1])


def prepared(service, i: int):
    """The AnswerStream of question ``i`` as the service would submit it (routed, loaded, checked)."""
    from kvzip_rag.generate import SamplingOptions, stream_answer

    target = service.route(ASKED[i][0]).targets[0]
    cache, _, _ = service.load(target)
    return stream_answer(service.model, cache, ASKED[i][0], SamplingOptions(clean=False, max_new_tokens=40))


def test_closing_a_request_frees_its_slot_at_once(stored, tiny_llama):
    from kvzip_rag.qa import QAService

    service = QAService(stored, tiny_llama, batching=True, max_batch=1)
    scheduler = service.scheduler
    first, second = prepared(service, 0), prepared(service, 1)
    running = scheduler.submit(first)
    queued = scheduler.submit(second)
    pieces = iter(running)
    next(pieces)  # it is decoding (max_batch=1: the other one waits)
    with service.lock:  # between two steps
        assert scheduler.running == 1 and scheduler.waiting == 1
        pieces.close()  # the consumer stops iterating
        assert scheduler.running == 0 and first.cache.tail_length == 0 and running.result is None
    assert "".join(queued) and second.result.finish_reason == "length"  # the slot went to the waiting one
    assert scheduler.running == scheduler.waiting == 0


def test_a_stream_consumer_that_stops_frees_its_slot(stored, tiny_llama):
    import time

    from kvzip_rag.qa import QAService

    service = QAService(stored, tiny_llama, batching=True)
    for piece in service.stream(ASKED[3][0], clean=False, max_new_tokens=200):
        break
    deadline = time.monotonic() + 60  # a wait for the state, not a timing assertion
    while service.scheduler.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert service.scheduler.running == 0 and service.scheduler.steps < 199


def test_a_full_queue_raises_at_once(stored, tiny_llama):
    from kvzip_rag.errors import QueueFullError

    from kvzip_rag.qa import QAService

    service = QAService(stored, tiny_llama, batching=True, max_batch=1, max_queue=1)
    scheduler = service.scheduler
    with service.lock:  # the scheduler cannot step: nothing leaves the queue meanwhile
        first = scheduler.submit(prepared(service, 0))
        with pytest.raises(QueueFullError, match="1 answers already wait"):
            scheduler.submit(prepared(service, 1))
    first.close()


def test_the_fair_lock_goes_to_the_waiting_thread_first():
    """A thread that releases and retakes the lock at once (the scheduler between steps) queues behind the threads
    already waiting (a plain RLock lets it take the lock straight back)."""
    import threading
    import time

    from kvzip_rag.scheduler import FairRLock

    lock, holding = FairRLock(), threading.Event()

    def waiter() -> None:
        with lock:
            holding.wait()

    lock.acquire()
    lock.acquire()  # reentrant
    thread = threading.Thread(target=waiter)
    thread.start()
    while not lock._waiters:  # a wait for the state, not a timing assertion
        time.sleep(0.001)
    lock.release()
    assert lock._is_owned()  # released once of twice: still ours
    lock.release()  # handed over to the waiting thread, now, whoever runs first
    assert not lock._is_owned() and not lock.acquire(blocking=False)
    holding.set()
    thread.join()
    assert lock.acquire(blocking=False)
    lock.release()
    with pytest.raises(RuntimeError):
        lock.release()


@pytest.mark.parametrize("sizes", [dict(max_batch=0), dict(max_queue=-1), dict(max_batch=True)])
def test_bad_batch_sizes_are_refused(stored, tiny_llama, sizes):
    from kvzip_rag.qa import QAService

    with pytest.raises(kvzip_rag.errors.InvalidArgumentError, match="must be a positive integer"):
        QAService(stored, tiny_llama, batching=True, **sizes)


# ---------------------------------------------------------------------------------------------- the adapters

GREEDY = range(0, len(ASKED), 2)  # the questions answered with the LONG greedy options in ``serial``


def test_langchain_batch_and_abatch_decode_together(stored, tiny_llama, serial):
    import asyncio

    from kvzip_rag.integrations.langchain import create_kvzip_qa_chain
    from kvzip_rag.qa import QAService

    service = QAService(stored, tiny_llama, batching=True)
    chain = create_kvzip_qa_chain(service, **LONG)
    questions = [ASKED[i][0] for i in GREEDY]
    batched = chain.batch(questions, config={"max_concurrency": len(questions)})
    assert service.scheduler.peak_batch > 1
    service.scheduler.peak_batch = 0
    awaited = asyncio.run(chain.abatch(questions))
    assert service.scheduler.peak_batch > 1
    for i, one, other in zip(GREEDY, batched, awaited):
        for out in (one, other):
            assert out["answer"] == serial[i].text
            assert [d.metadata["doc_id"] for d in out["sources"]] == [ASKED[i][1]]


def test_llamaindex_concurrent_aquery_decodes_together(tiny_llama, tmp_path):
    import asyncio

    from llama_index.core import Document

    from kvzip_rag import KVzipIndex

    index = KVzipIndex.from_documents([Document(text=text, doc_id=doc_id) for doc_id, text in DOCS.items()],
                                      model=tiny_llama, store=tmp_path / "store", batching=True)
    engine = index.as_query_engine(**LONG)

    async def main():
        return await asyncio.gather(*(engine.aquery(q) for q, _ in ASKED))

    responses = asyncio.run(main())
    assert index.qa.scheduler.peak_batch > 1
    for response, (question, doc_id) in zip(responses, ASKED):
        assert [n.node.ref_doc_id for n in response.source_nodes] == [doc_id]
        cache = index.store.load_cache(doc_id, tiny_llama)
        assert response.response == kvzip_rag.answer(tiny_llama, cache, question, clean=False,
                                                      max_new_tokens=12).text


# ---------------------------------------------------------------------------------------------- the benchmark


def test_the_steady_rate_counts_the_tokens_made_while_every_client_asked():
    from kvzip_rag.bench.serve_batching import steady_rate

    rows = [{"tokens": 10, "span": (1.0, 3.0)},  # done before the drain: all 10
            {"tokens": 8, "span": (2.0, 6.0)},  # half of it before 4 s: 4
            {"tokens": 5, "span": (5.0, 7.0)},  # after: none
            {"tokens": 1, "span": (4.0, 4.0)}]  # one token, at the drain: counted
    assert steady_rate(rows, 4.0) == pytest.approx((10 + 4 + 1) / 4.0)
    assert steady_rate(rows, 8.0) == pytest.approx(24 / 8.0)  # no tail: the whole run's rate


def test_serve_benchmark_runs_both_paths_and_writes_its_report(tiny_model_dir, tmp_path, monkeypatch):  # noqa: F811
    import json

    from typer.testing import CliRunner

    from conftest import DATA_DIR
    from kvzip_rag.bench import serve_batching as serve
    from kvzip_rag.cli import app

    if not (DATA_DIR / "squad").exists():
        pytest.skip("SQuAD data not found")
    result = serve.run_serve(str(tiny_model_dir), DATA_DIR, requests=4, max_new_tokens=6, threads=1,
                             log=lambda message: None, matmuls=("float32",))
    assert result["documents"] >= 20
    assert [(r["path"], r["clients"]) for r in result["settings"]] == [
        (path, clients) for clients in serve.CLIENTS for path in ("serial", "batched")]
    assert all(r["n"] == 4 and r["tokens_per_s"] > 0 and r["ttft_p50_s"] <= r["latency_p95_s"]
               for r in result["settings"])
    # while every client asks: measured where each had a question (4 answers, up to 4 clients), else not at all
    assert all((r["steady_tokens_per_s"] > 0) if r["clients"] <= 4 else r["steady_tokens_per_s"] is None
               for r in result["settings"])
    for r in result["settings"]:  # the burst of first questions left out: only clients that asked again count
        later = [a["ttft_s"] for a in r["answers"] if not a["client_first"]]
        assert sum(not a["client_first"] for a in r["answers"]) == max(4 - r["clients"], 0)
        assert r["ttft_p95_after_first_s"] == (serve.percentile(later, 0.95) if later else None)
    assert result["agreement"]["compared"] == 4 * len(serve.CLIENTS)
    assert result["agreement"]["equal"] == result["agreement"]["compared"]  # greedy: the same answers
    assert "| batched | float32 | 8 | 4 |" in serve.markdown(result)
    previous = torch.get_num_threads()
    monkeypatch.setattr(kvzip_rag.runtime, "free_cores", lambda: 1)  # a busy machine: the policy alone picks 1
    try:
        run = CliRunner().invoke(app, ["bench", "--task", "serve", "--model", str(tiny_model_dir), "--threads", "2",
                                       "--data", str(DATA_DIR), "--out", str(tmp_path / "out"), "--limit", "2"])
    finally:
        torch.set_num_threads(previous)
    assert run.exit_code == 0, run.output
    assert {p.name for p in (tmp_path / "out").iterdir()} == {f"serve.{ext}" for ext in ("json", "md", "png")}
    report = (tmp_path / "out" / "serve.md").read_text()
    assert "| batched | float32 | 16 | 2 |" in report  # --limit: answers per setting
    ran = json.loads((tmp_path / "out" / "serve.json").read_text())
    assert ran["threads"] == 2  # --threads is what ran
    matmuls = serve.default_matmuls()  # bfloat16 too where the CPU multiplies it, beside the float32 reference
    assert [(r["matmul"], r["path"], r["clients"]) for r in ran["settings"]] == [
        (matmul, path, clients) for matmul in matmuls for clients in serve.CLIENTS for path in ("serial", "batched")]
    assert ("| bfloat16 | 8 |" in report) == ("bfloat16" in matmuls)  # the speedups over float32's serial path


# ---------------------------------------------------------------------------------------------- batched prefill in the scheduler


def test_questions_arriving_together_are_prefilled_in_one_pass(stored, tiny_llama, serial):
    """Three requests queued while the scheduler cannot step are admitted together: one forward pass prefills the
    three questions over their three caches, and each answer is still its serial one."""
    from kvzip_rag.qa import QAService

    service = QAService(stored, tiny_llama, batching=True)
    scheduler = service.scheduler
    chosen = [0, 2, 4]
    with service.lock:
        requests = []
        for i in chosen:
            target = service.route(ASKED[i][0]).targets[0]
            cache, _, _ = service.load(target)
            requests.append(scheduler.submit(kvzip_rag.generate.stream_answer(
                tiny_llama, cache, ASKED[i][0], kvzip_rag.generate.SamplingOptions(**{
                    k: v for k, v in options_for(i).items() if k != "evidence"}))))
        assert scheduler.waiting == 3 and scheduler.steps == 0
    texts = ["".join(request) for request in requests]
    assert scheduler.peak_prefill == 3 and scheduler.peak_batch == 3
    for i, request, text in zip(chosen, requests, texts):
        assert request.result.token_ids == serial[i].answers[0].answer.token_ids
        assert text.strip() == request.result.text


@pytest.mark.parametrize("batching", [False, True])
def test_an_answer_makes_its_room_once_before_its_first_pass(stored, tiny_llama, monkeypatch, batching):
    """The prompt and an answer of up to ``ANSWER_ROOM`` tokens fit the room reserved before the first pass: every
    cache layer grows once per answer, never midway (a regrowth would also take the layer out of its batch arena,
    which the next step rebuilds), serial or batched; the answers stay their serial ones."""
    from concurrent.futures import ThreadPoolExecutor

    from kvzip_rag.generate import ANSWER_ROOM
    from kvzip_rag.qa import QAService

    length = ANSWER_ROOM
    options = dict(LONG, max_new_tokens=length)
    reference = QAService(stored, tiny_llama)
    expected = [reference.answer(q, **options).best.answer.token_ids for q, _ in ASKED[:3]]
    grows = count_calls(monkeypatch, "_grow", kvzip_rag.PackedLayer)
    service = QAService(stored, tiny_llama, batching=batching)
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda i: service.answer(ASKED[i][0], **options), range(3)))
    assert [r.best.answer.token_ids for r in got] == expected
    assert all(len(tokens) == length for tokens in expected)
    # prompt and answer run past the first room a growing tail would take
    assert min(len(tiny_llama.encode(tiny_llama.template.question_text(q))) for q, _ in ASKED[:3]) + length > \
        kvzip_rag.PackedLayer.MIN_ROOM
    assert len(grows) == 3 * tiny_llama.config.num_hidden_layers


# ---------------------------------------------------------------------------------------------- chat turns

def chat_script(i: int) -> list[str]:
    """Session ``i``'s turns: a question, a follow-up that stays, a question about another town (recomposed)."""
    return [ASKED[i][0], "What does its market sell?", ASKED[(i + 5) % len(ASKED)][0]]


def test_chat_turns_of_four_sessions_decode_together_and_equal_their_one_at_a_time_answers(stored, tiny_llama):
    from concurrent.futures import ThreadPoolExecutor

    from kvzip_rag.dialogue import ChatSession
    from kvzip_rag.qa import QAService

    sessions = []

    def run(service, i: int) -> list:
        session = ChatSession(service, sampling=options_for(i))
        sessions.append(session)
        return [session.ask(question) for question in chat_script(i)]

    alone = QAService(stored, tiny_llama)
    expected = [run(alone, i) for i in range(4)]
    service = QAService(stored, tiny_llama, batching=True)
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: run(service, i), range(4)))
    assert service.scheduler.peak_batch > 1  # turns of different sessions shared forward passes
    # a conversation's cache outlives its turns' batches: it owns its buffers again, no batch arena kept alive
    assert all(layer.arena_slot is None for s in sessions for layer in s.conversation.cache.layers)
    for turns, reference in zip(got, expected):
        assert [t.change for t in turns] == [t.change for t in reference] == ["new", "kept", "recomposed"]
        for turn, ref in zip(turns, reference):
            assert turn.answer.token_ids == ref.answer.token_ids and turn.text == ref.text
            assert turn.info["doc_ids"] == ref.info["doc_ids"]
    assert service.scheduler.running == service.scheduler.waiting == 0


def test_a_session_takes_one_turn_at_a_time(stored, tiny_llama):
    """Two turns of one session asked at once (the first lets the service's lock go while it decodes): the second
    waits for the first, so the conversation is what asking them one after the other gives."""
    from concurrent.futures import ThreadPoolExecutor

    from kvzip_rag.dialogue import ChatSession
    from kvzip_rag.qa import QAService

    service = QAService(stored, tiny_llama, batching=True)
    session = ChatSession(service, sampling=LONG)
    with ThreadPoolExecutor(2) as pool:
        turns = list(pool.map(session.ask, chat_script(0)[:2]))
    assert sorted(t.info["turns"] for t in turns) == [1, 2]
    reference = ChatSession(QAService(stored, tiny_llama), sampling=LONG)
    for question, _ in session.conversation.turns:
        reference.ask(question)
    assert session.conversation.turns == reference.conversation.turns


def test_a_turn_abandoned_midway_leaves_the_session_as_it_was(stored, tiny_llama):
    """A turn whose consumer fails after its first piece (in the scheduler, beside nothing): the session's next
    turn is what it would be had the abandoned one never been asked."""
    from kvzip_rag.dialogue import ChatSession
    from kvzip_rag.qa import QAService

    class Gone(Exception):
        pass

    def fail(piece: str) -> None:
        raise Gone

    session = ChatSession(QAService(stored, tiny_llama, batching=True), sampling=LONG)
    first, follow_up = chat_script(0)[:2]
    session.ask(first)
    with pytest.raises(Gone):
        session.ask("Tell me more about it.", emit=fail)
    turn = session.ask(follow_up)
    reference = ChatSession(QAService(stored, tiny_llama), sampling=LONG)
    reference.ask(first)
    expected = reference.ask(follow_up)
    assert turn.answer.token_ids == expected.answer.token_ids
    assert session.conversation.turns == reference.conversation.turns
    assert session.conversation.cache.get_seq_length() == reference.conversation.cache.get_seq_length()
    assert session.service.scheduler.running == 0


def test_concurrent_messages_to_one_llamaindex_chat_engine_each_get_their_own_sources(tiny_llama, tmp_path):
    """Two messages about different towns sent at once to one chat engine: the session answers them one after
    the other, and each response names the documents its own turn answered from."""
    import asyncio

    from llama_index.core import Document

    from kvzip_rag import KVzipIndex

    index = KVzipIndex.from_documents([Document(text=text, doc_id=doc_id) for doc_id, text in DOCS.items()],
                                      model=tiny_llama, store=tmp_path / "store", batching=True)
    engine = index.as_chat_engine(**LONG)
    asked = [ASKED[0], ASKED[5]]

    async def both():
        return await asyncio.gather(*(engine.achat(question) for question, _ in asked))

    for response, (_, doc_id) in zip(asyncio.run(both()), asked):
        assert response.metadata["doc_ids"][0] == doc_id
        assert {n.node.ref_doc_id for n in response.source_nodes} == set(response.metadata["doc_ids"])
    assert sorted(len(r.metadata["doc_ids"]) for r in asyncio.run(both())) == [2, 2]


def test_llamaindex_chat_engines_and_langchain_chat_go_through_the_scheduler(tiny_llama, tmp_path):
    import asyncio

    from langchain_core.messages import AIMessage, HumanMessage
    from llama_index.core import Document

    from kvzip_rag import KVzipIndex
    from kvzip_rag.dialogue import ChatSession
    from kvzip_rag.integrations.langchain import ChatKVzip
    from kvzip_rag.qa import QAService

    index = KVzipIndex.from_documents([Document(text=text, doc_id=doc_id) for doc_id, text in DOCS.items()],
                                      model=tiny_llama, store=tmp_path / "store", batching=True)
    alone = QAService(index.store, tiny_llama)
    submitted = []
    submit = index.qa.scheduler.submit
    index.qa.scheduler.submit = lambda stream: submitted.append(stream.keep) or submit(stream)

    engines = [index.as_chat_engine(**LONG) for _ in range(4)]

    async def chats():
        first = await asyncio.gather(*(e.achat(chat_script(i)[0]) for i, e in enumerate(engines)))
        return first, await asyncio.gather(*(e.achat(chat_script(i)[1]) for i, e in enumerate(engines)))

    responses = asyncio.run(chats())
    assert submitted.count(True) == 8 and index.qa.scheduler.peak_batch > 1
    for i in range(4):
        session = ChatSession(alone, sampling=LONG)
        for step in range(2):
            assert responses[step][i].response == session.ask(chat_script(i)[step]).text

    submitted.clear()
    chat = ChatKVzip(qa=index.qa, max_new_tokens=12)
    conversations = [[HumanMessage(chat_script(i)[0]), AIMessage("It was founded long ago."),
                      HumanMessage(chat_script(i)[1])] for i in range(4)]
    answers = asyncio.run(chat.abatch(conversations))
    assert submitted.count(True) == 4  # each conversation's turn decoded in the scheduler
    reference = ChatKVzip(qa=alone, max_new_tokens=12)
    assert [a.content for a in answers] == [reference.invoke(c).content for c in conversations]


# ---------------------------------------------------------------------------------------------- closing


def test_close_fails_held_requests_stops_the_thread_and_refuses_later_questions(stored, tiny_llama):
    import threading

    from kvzip_rag.errors import ServiceClosedError
    from kvzip_rag.qa import QAService

    with QAService(stored, tiny_llama, batching=True, max_batch=1) as service:
        scheduler = service.scheduler
        with service.lock:  # the scheduler cannot step: one request admitted at its first step, one waiting
            running, queued = scheduler.submit(prepared(service, 0)), scheduler.submit(prepared(service, 1))
        pieces = iter(running)
        next(pieces)
        assert scheduler.alive and scheduler.running == 1 and scheduler.waiting == 1
    assert service.closed and not scheduler.alive and scheduler._thread not in threading.enumerate()
    with pytest.raises(ServiceClosedError, match="closed while this answer was being decoded"):
        list(pieces)
    with pytest.raises(ServiceClosedError, match="closed while this answer waited in the queue"):
        list(queued)
    assert running.stream.cache.tail_length == queued.stream.cache.tail_length == 0
    for ask in (lambda: service.answer(ASKED[0][0]), lambda: service.stream(ASKED[0][0]),
                lambda: scheduler.submit(prepared(service, 2))):
        with pytest.raises(ServiceClosedError, match="closed"):
            ask()
    service.close()  # again: nothing left to do


def test_closing_an_unbatched_service_refuses_later_questions(stored, tiny_llama):
    from kvzip_rag.dialogue import ChatSession
    from kvzip_rag.errors import ServiceClosedError
    from kvzip_rag.qa import QAService

    service = QAService(stored, tiny_llama)
    session = ChatSession(service, sampling=LONG)
    session.ask(ASKED[0][0])
    service.close()
    with pytest.raises(ServiceClosedError, match="this QAService was closed"):
        service.answer(ASKED[0][0])
    with pytest.raises(ServiceClosedError, match="this QAService was closed"):
        session.ask(ASKED[1][0])
