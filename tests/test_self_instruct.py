"""Self-instruct: ROUGE-L and the fast novelty filter, config errors, the scripted
OpenAI-compatible server (every filter fires with exact counts), visual rows, resume after a
kill, seeded determinism, and a tiny random local model through the real generation path."""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from peftvlm.data.self_instruct import load_config, run_self_instruct
from peftvlm.data.self_instruct.generators import Generation
from peftvlm.data.self_instruct.rouge import (NoveltyIndex, fast_novelty_filter, lcs_length,
                                              naive_novelty_filter, rouge_l)
from peftvlm.errors import ModelError, RecipeError, RunError

ROOT = Path(__file__).resolve().parent.parent
SEEDS = ROOT / "data_templates" / "self_instruct" / "seed_tasks.jsonl"
SECRET = "sk-test-secret-4242"


# --- ROUGE-L --------------------------------------------------------------------------------

def _random_text(rng: random.Random, vocab: list[str], max_words: int = 14) -> str:
    seps = [" ", " ", ", ", "-", ". ", "  ", "/"]
    return "".join(rng.choice(vocab) + rng.choice(seps) for _ in range(rng.randint(0, max_words)))


def test_rouge_l_matches_rouge_score_on_random_strings():
    from rouge_score import rouge_scorer

    rng = random.Random(1)
    vocab = ["the", "The", "cat", "CATS", "image", "x-ray", "3", "42b", "é", "naïve", "running",
             "runs", "a", "on", "box"]
    for use_stemmer in (False, True):
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
        for _ in range(1500):
            a, b = _random_text(rng, vocab), _random_text(rng, vocab)
            assert rouge_l(a, b, use_stemmer) == scorer.score(a, b)["rougeL"].fmeasure, (a, b)


def test_bit_parallel_lcs_equals_dynamic_programming():
    from rouge_score.rouge_scorer import _lcs_table

    rng = random.Random(2)
    for _ in range(500):
        a = [rng.choice("abcde") for _ in range(rng.randint(0, 70))]
        b = [rng.choice("abcde") for _ in range(rng.randint(0, 70))]
        expected = _lcs_table(a, b)[-1][-1] if a and b else 0
        assert lcs_length(a, b) == expected


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.7, 0.9, 1.0])
def test_fast_novelty_filter_makes_the_naive_decisions(threshold):
    # A tiny vocabulary makes many pairs sit exactly on the threshold (ties, equal lengths).
    rng = random.Random(int(threshold * 10))
    vocab = ["a", "b", "c", "d", "e", "f"]
    pool = [_random_text(rng, vocab, 10) for _ in range(60)]
    candidates = [_random_text(rng, vocab, 10) for _ in range(250)]
    naive = naive_novelty_filter(candidates, pool, threshold)
    assert fast_novelty_filter(candidates, pool, threshold) == naive
    assert 0 < sum(naive) or threshold == 0.0


@pytest.mark.parametrize("lcs, m, n", [(7, 7, 13), (7, 8, 12), (7, 9, 11), (4, 5, 11)])
def test_exact_threshold_ties_are_decided_as_rouge_score_rounds_them(lcs, m, n):
    # 2*lcs/(m+n) is exactly the threshold, yet rouge-score's float F1 lands just above it,
    # so it rejects; the bounds of the fast filter must not skip such pairs.
    threshold = 2 * lcs / (m + n)
    shared = [f"s{i}" for i in range(lcs)]
    pool = " ".join([f"p{i}" for i in range(n - lcs)] + shared)
    candidate = " ".join(shared + [f"c{i}" for i in range(m - lcs)])
    naive = naive_novelty_filter([candidate], [pool], threshold)
    assert naive == [False] and fast_novelty_filter([candidate], [pool], threshold) == naive


def test_novelty_index_reports_the_first_similar_text():
    index = NoveltyIndex(0.7)
    for text in ["Describe the image in detail.", "Count the dogs.", "What is on the table?"]:
        index.add(text)
    assert index.find_similar("describe this image in detail") == (0, pytest.approx(0.8))
    assert index.find_similar("Name the painter of this portrait.") is None
    assert index.find_similar("!!!") is None  # no tokens: rouge-score scores 0
    assert not index.check_and_add("What is on the table") and len(index) == 3


# --- config ---------------------------------------------------------------------------------

def write_config(tmp_path: Path, **fields) -> Path:
    data = {"seed_tasks": str(SEEDS), "output": "out/gen.jsonl", "num_instructions": 4,
            "generator": {"type": "openai", "url": "http://127.0.0.1:9/v1", "model": "m"}}
    data.update(fields)
    path = tmp_path / "si.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("fields, message", [
    ({"colour": 1}, "si.yaml: colour: unknown key `colour`; allowed: batch_size"),
    ({"filters": {"rouge": 0.5}}, "si.yaml: filters.rouge: unknown key `rouge`; allowed: "
                                  "blacklist, drop_truncated"),
    ({"generator": {"type": "openai", "url": "u", "model": "m", "key": "x"}},
     "si.yaml: generator.key: unknown key `key`; allowed: api_key_env"),
    ({"generator": {"type": "local"}}, "si.yaml: generator.path: required field is missing"),
    ({"generator": {"type": "gpt"}}, "si.yaml: generator: unknown type 'gpt'; available: local, openai"),
    ({"num_instructions": 0}, "si.yaml: num_instructions: Input should be greater than or equal"),
    ({"filters": {"min_words": 9, "max_words": 5}}, "si.yaml: filters: Value error, min_words"),
    ({"mode": "visual"}, "visual mode needs `images`"),
    ({"mode": "visual", "images": "i.jsonl", "task_types": ["poetry"]}, "unknown task type"),
    ({"seed_tasks": "missing.jsonl"}, "si.yaml: seed_tasks: file missing.jsonl does not exist"),
])
def test_bad_configs_name_the_file_and_field(tmp_path, fields, message):
    with pytest.raises(RecipeError) as err:
        load_config(write_config(tmp_path, **fields))
    assert message in str(err.value)


def test_missing_config_file_is_a_recipe_error(tmp_path):
    with pytest.raises(RecipeError, match="self-instruct config .*nope.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_shipped_seeds_and_example_config_are_valid():
    from peftvlm.data.self_instruct.seeds import load_seed_tasks

    seeds = load_seed_tasks(SEEDS)
    assert len(seeds) >= 30 and len({s.instruction for s in seeds}) == len(seeds)
    for task_type in ("conversation", "detailed_description", "complex_reasoning"):
        assert sum(s.task_type == task_type and s.context is not None for s in seeds) >= 3
    config = load_config(ROOT / "data_templates" / "self_instruct" / "example.yaml")
    assert config.generator.type == "local" and config.resolve(config.seed_tasks) == SEEDS.resolve()


# --- a scripted OpenAI-compatible server ----------------------------------------------------

class Server:
    """chat/completions on 127.0.0.1: `script(seed, prompt, attempt)` -> (status, content,
    finish_reason, delay_s); records every request."""

    def __init__(self, script):
        self.script, self.requests, self.attempts = script, [], {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                seed = body["seed"]
                attempt = server.attempts[seed] = server.attempts.get(seed, 0) + 1
                server.requests.append({"path": self.path, "body": body,
                                        "auth": self.headers.get("Authorization")})
                status, content, finish, delay = server.script(seed, body["messages"][0]["content"],
                                                               attempt)
                time.sleep(delay)
                payload = ({"choices": [{"message": {"role": "assistant", "content": content},
                                         "finish_reason": finish}]}
                           if status == 200 else {"error": content})
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(script):
        servers.append(Server(script))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def task(instruction: str, output: str, task_input: str = "", number: int = 5) -> str:
    return (f"Task {number}\nInstruction: {instruction}\nInput: {task_input or '<noinput>'}\n"
            f"Output: {output}\n\n")


LONG_OUTPUT = " ".join(f"word{i}" for i in range(100))
RESPONSES = {  # seed -> (content, finish_reason); seed = config seed (0) + prompt index
    0: ("Instruction: Name the tallest building visible in the skyline photo.\n"
        "Input: <noinput>\nOutput: The glass tower on the left.\n\n"
        + task("Describe.", "Something.")                                   # too_short
        + task(" ".join(["very"] * 160) + " long", "ok")                   # too_long
        + task("Summarise the audio track of this clip in one line.", "Birds sing.")  # blacklisted
        + task("Explain what normalised bounding-box coordinates are.", "Fractions.")  # exact dup
        + task("Explain what normalised bounding box coordinates mean.", "Fractions.")  # not novel
        + task("Repeat the word given in the input twice please.", "hello", "hello")  # in == out
        + task("Tell me the colour of the sky in this picture.", "")       # empty_output
        + "Task 12\nThis piece has no fields at all.\n", "stop"),           # malformed
    1: (task("Describe the scene for a radio listener in full detail.", LONG_OUTPUT, number=4)
        + task("Narrate the image aloud.", LONG_OUTPUT), "stop"),           # near_duplicate
    2: (task("Which season does the photograph of the park most likely show?", "Autumn.", number=4)
        + task("Estimate how far apart the two benches in the image are.", "About ten metres."),
        "length"),                                                          # truncated (parsed)
    3: (task("Compare the two dogs in the image by size and colour.", "The left one", number=4)
        + "Task 5\nInstruction: List the obj", "length"),                    # truncated (cut)
}


def scripted(seed, prompt, attempt):
    content, finish = RESPONSES[seed]
    return 200, content, finish, 0


def test_openai_endpoint_every_filter_fires_with_exact_counts(tmp_path, serve, monkeypatch,
                                                              capsys):
    server = serve(scripted)
    monkeypatch.setenv("PEFTVLM_TEST_KEY", SECRET)
    config = load_config(write_config(
        tmp_path, num_instructions=10, max_prompts=4, batch_size=1, seed_examples_per_prompt=2,
        generated_examples_per_prompt=1,
        generator={"type": "openai", "url": server.url, "model": "m", "timeout_s": 5,
                   "api_key_env": "PEFTVLM_TEST_KEY"}))
    report = run_self_instruct(config, log=print)

    assert report["rejected"] == {
        "truncated": 2, "malformed": 1, "empty_output": 1, "input_equals_output": 1,
        "too_short": 1, "too_long": 1, "blacklisted": 1, "exact_duplicate": 1, "not_novel": 1,
        "near_duplicate": 1}
    assert (report["kept"], report["prompts"], report["responses"]) == (4, 4, 4)
    assert report["candidates"] == 4 + 9  # kept + filtered (the parsed truncated one included)
    assert report["stopped_because"] == "prompt budget (max_prompts) spent"
    rows = [json.loads(line) for line in (tmp_path / "out" / "gen.jsonl").read_text().splitlines()]
    assert [r["messages"][0]["content"][0]["text"] for r in rows] == [
        "Name the tallest building visible in the skyline photo.",
        "Describe the scene for a radio listener in full detail.",
        "Which season does the photograph of the park most likely show?",
        "Compare the two dogs in the image by size and colour."]
    first_question = rows[0]["messages"][0]["content"][0]["text"]
    assert rows[0] == {"images": [], "messages": [
        {"role": "user", "content": [{"type": "text", "text": first_question}]},
        {"role": "assistant", "content": [{"type": "text",
                                           "text": "The glass tower on the left."}]}]}
    assert json.loads((tmp_path / "out" / "gen.report.json").read_text()) == report

    # Requests: chat/completions with the key; 2 seeds + (from prompt 1 on) 1 kept example.
    assert {r["path"] for r in server.requests} == {"/v1/chat/completions"}
    assert {r["auth"] for r in server.requests} == {f"Bearer {SECRET}"}
    assert [r["body"]["seed"] for r in server.requests] == [0, 1, 2, 3]
    prompts = [r["body"]["messages"][0]["content"] for r in server.requests]
    assert prompts[0].count("\nInstruction: ") == 2 and prompts[0].endswith("Task 3\n")
    assert prompts[1].count("\nInstruction: ") == 3 and rows[0]["messages"][0]["content"][0][
        "text"] in prompts[1]
    secret_seen = [p.read_text() for p in (tmp_path / "out").iterdir()] + [capsys.readouterr().out]
    assert not any(SECRET in text for text in secret_seen)


def test_openai_retries_timeouts_and_server_errors_then_fails_without_the_key(
        tmp_path, serve, monkeypatch):
    def flaky(seed, prompt, attempt):
        if seed == 0 and attempt == 1:
            return 200, "late", "stop", 1.0  # beyond the 0.3 s timeout: retried
        if seed == 1 and attempt <= 2:
            return 503, "busy", None, 0
        if seed >= 2:
            return 500, f"echo Bearer {SECRET}", None, 0
        return 200, task("Name every object on the table in the image.", "A cup.", number=3), \
            "stop", 0

    server = serve(flaky)
    monkeypatch.setenv("PEFTVLM_TEST_KEY", SECRET)
    gen = {"type": "openai", "url": server.url, "model": "m", "timeout_s": 0.3, "max_retries": 2,
           "retry_backoff_s": 0.01, "api_key_env": "PEFTVLM_TEST_KEY"}
    config = load_config(write_config(tmp_path, batch_size=2, max_prompts=2, generator=gen))
    report = run_self_instruct(config)
    assert server.attempts == {0: 2, 1: 3} and report["kept"] == 1

    config = load_config(write_config(tmp_path, batch_size=1, max_prompts=3, generator=gen))
    with pytest.raises(ModelError) as err:
        run_self_instruct(config, overwrite=True)
    assert server.attempts[2] == 3 and "failed 3 time(s)" in str(err.value)
    assert "HTTP 500" in str(err.value) and SECRET not in str(err.value)


def test_missing_key_variable_and_unreachable_server_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("PEFTVLM_NO_SUCH_KEY", raising=False)
    gen = {"type": "openai", "url": "http://127.0.0.1:9/v1", "model": "m",
           "api_key_env": "PEFTVLM_NO_SUCH_KEY"}
    with pytest.raises(RecipeError, match="PEFTVLM_NO_SUCH_KEY is not set"):
        run_self_instruct(load_config(write_config(tmp_path, generator=gen)))
    gen = {"type": "openai", "url": "http://127.0.0.1:9/v1", "model": "m", "max_retries": 0}
    with pytest.raises(ModelError, match="is the server running"):
        run_self_instruct(load_config(write_config(tmp_path, generator=gen)), overwrite=True)


# --- visual mode ----------------------------------------------------------------------------

def make_images(root: Path) -> Path:
    from PIL import Image

    (root / "imgs").mkdir(parents=True)
    rows = []
    for name, colour, label in (("a.png", "red", "dog"), ("b.png", "blue", "kite")):
        Image.new("RGB", (16, 16), colour).save(root / "imgs" / name)
        rows.append({"image": f"imgs/{name}", "captions": [f"A {label} in a {colour} room."],
                     "objects": [{"label": label, "box": [0.1, 0.2, 0.5, 0.9]}]})
    path = root / "images.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def visual_script(seed, prompt, attempt):
    if "conversation of" in prompt:  # both images get the same questions: pools are per image
        return 200, ("What animal or object is shown here?\nAnswer: A single one, near the left."
                     "\nQuestion: Where is it placed in the room?\nAnswer: On the left side."), \
            "stop", 0
    if "detailed description" in prompt:
        return 200, (f"Question: Describe this picture thoroughly, image {seed}.\nAnswer: A "
                     f"plain room with one object standing on the left, variant {seed}."), "stop", 0
    return 200, ("Question: Why might the owner keep it in this room?\nAnswer: It is probably "
                 "stored there.\nQuestion: What could happen next to it?\nAnswer: Someone may "
                 "move it."), "stop", 0


def test_visual_mode_writes_image_rows_the_trainer_reads(tmp_path, serve):
    from peftvlm.data.read.sources import to_conversation

    server = serve(visual_script)
    images = make_images(tmp_path / "data")
    config = load_config(write_config(
        tmp_path, mode="visual", images=str(images), output="data/visual.jsonl",
        num_instructions=8, batch_size=3, tasks_per_prompt=2,
        generator={"type": "openai", "url": server.url, "model": "m"}))
    report = run_self_instruct(config)
    out = tmp_path / "data" / "visual.jsonl"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert report["kept"] == 8 and len(rows) == 8 and report["prompts"] == 6
    a, b = ["imgs/a.png"], ["imgs/b.png"]  # prompts: conversation a, b; description a, b; ...
    assert [r["images"] for r in rows] == [a, b, a, b, a, a, b, b]
    conversation = rows[0]["messages"]
    assert [m["role"] for m in conversation] == ["user", "assistant"] * 2
    assert conversation[0]["content"][0] == {"type": "image"}
    assert conversation[2]["content"] == [{"type": "text",
                                           "text": "Where is it placed in the room?"}]
    description = rows[2]["messages"]
    assert len(description) == 2 and "thoroughly" in description[0]["content"][1]["text"]
    for row in rows:
        loaded = to_conversation(row, out.parent)
        assert Path(loaded["images"][0]).is_file()
    first = next(r["body"]["messages"][0]["content"] for r in server.requests
                 if r["body"]["seed"] == 0)
    assert "- dog: [0.10, 0.20, 0.50, 0.90]" in first and first.endswith("Question:")
    assert "Example 1\nCaptions:" in first  # seed conversations shown with their annotations


def test_visual_images_outside_the_output_folder_are_refused(tmp_path):
    from peftvlm.data.self_instruct.pipeline import SelfInstruct
    from peftvlm.errors import DataError

    images = make_images(tmp_path / "data")
    config = load_config(write_config(tmp_path, mode="visual", images=str(images),
                                      output="elsewhere/v.jsonl"))
    with pytest.raises(DataError, match="outside the output folder"):
        SelfInstruct(config)


# --- resume and determinism (scripted in-process generator) ---------------------------------

WORDS = ("apple bridge candle dragon engine forest garden harbor island jacket kettle lantern "
         "meadow needle orchard pencil quarry river saddle tunnel violin window yacht "
         "zebra").split()


class HashGenerator:
    """Deterministic answers derived from each prompt, so a resumed run that built different
    prompts would write different rows. `fail_on_call` simulates a kill."""

    def __init__(self, fail_on_call=None):
        self.calls, self.prompts, self.fail_on_call = 0, [], fail_on_call

    def describe(self):
        return "hash generator"

    def generate(self, prompts, seeds, max_new_tokens):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise KeyboardInterrupt
        self.prompts += prompts
        return [Generation(self._answer(p, s), False) for p, s in zip(prompts, seeds)]

    @staticmethod
    def _answer(prompt, seed):
        rng = random.Random(hashlib.sha256(f"{seed}{prompt}".encode()).hexdigest())
        return "".join(task(" ".join(rng.sample(WORDS, rng.randint(3, 9))),
                            " ".join(rng.sample(WORDS, 4)), number=i) for i in range(3))


def run_hash(tmp_path, name, generator, **fields):
    config = load_config(write_config(tmp_path, output=f"{name}/gen.jsonl", num_instructions=20,
                                      batch_size=2, **fields))
    return run_self_instruct(config, generator_factory=lambda c, d: generator), \
        tmp_path / name / "gen.jsonl"


def test_killed_run_resumes_without_duplicates(tmp_path):
    reference, ref_out = run_hash(tmp_path, "ref", HashGenerator())
    with pytest.raises(KeyboardInterrupt):
        run_hash(tmp_path, "killed", HashGenerator(fail_on_call=3))
    out = tmp_path / "killed" / "gen.jsonl"
    committed = out.read_text().splitlines()
    assert 0 < len(committed) < 20
    with out.open("a") as f:  # a kill in the middle of the next batch's append
        f.write('{"messages": [{"role": "user", "content": [{"ty')
    with (tmp_path / "killed" / "gen.pool.jsonl").open("a") as f:
        f.write('{"task_type": "gen')
    resumed, _ = run_hash(tmp_path, "killed", HashGenerator())
    lines = out.read_text().splitlines()
    assert out.read_bytes() == ref_out.read_bytes() and len(lines) == 20 == len(set(lines))
    assert lines[:len(committed)] == committed
    assert {k: v for k, v in resumed.items() if k not in ("output", "generator")} == \
        {k: v for k, v in reference.items() if k not in ("output", "generator")}
    again, _ = run_hash(tmp_path, "killed", HashGenerator(fail_on_call=1))  # finished: no calls
    assert again["kept"] == 20 and out.read_text().splitlines() == lines


def test_a_kill_inside_the_first_batch_resumes_too(tmp_path):
    _, ref_out = run_hash(tmp_path, "ref", HashGenerator())
    with pytest.raises(KeyboardInterrupt):
        run_hash(tmp_path, "killed", HashGenerator(fail_on_call=1))
    out = tmp_path / "killed" / "gen.jsonl"
    out.write_text('{"messages": [')  # half a row, never committed
    run_hash(tmp_path, "killed", HashGenerator())
    assert out.read_bytes() == ref_out.read_bytes()


def test_existing_output_without_state_and_changed_settings_are_refused(tmp_path):
    run_hash(tmp_path, "a", HashGenerator())
    with pytest.raises(RunError, match="different settings"):
        run_hash(tmp_path, "a", HashGenerator(), seed=1)
    (tmp_path / "a" / "gen.state.json").unlink()
    with pytest.raises(RunError, match="--overwrite"):
        run_hash(tmp_path, "a", HashGenerator())


def test_same_seed_same_rows_other_seed_other_prompts(tmp_path):
    gens = [HashGenerator() for _ in range(3)]
    _, out_a = run_hash(tmp_path, "a", gens[0])
    _, out_b = run_hash(tmp_path, "b", gens[1])
    _, out_c = run_hash(tmp_path, "c", gens[2], seed=7)
    assert gens[0].prompts == gens[1].prompts and out_a.read_bytes() == out_b.read_bytes()
    assert gens[0].prompts[0] != gens[2].prompts[0] and out_a.read_bytes() != out_c.read_bytes()


# --- a tiny random local model through transformers generation ------------------------------

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}")


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftvlm.families._tokenizer import build_tiny_tokenizer

    torch.manual_seed(0)
    tok = build_tiny_tokenizer(chat_template=CHAT_TEMPLATE)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    path = tmp_path_factory.mktemp("tiny-lm")
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_local_generation_is_batched_with_left_padding_and_seeded(tiny_lm, tmp_path):
    from peftvlm.data.self_instruct.config import LocalGeneratorConfig
    from peftvlm.data.self_instruct.generators import LocalGenerator

    greedy = LocalGenerator(LocalGeneratorConfig(type="local", path=str(tiny_lm), temperature=0),
                            tmp_path)
    prompts = ["Describe the image.", "What color is the shape in the picture on the left?"]
    batched = greedy.generate(prompts, [0, 1], 8)
    single = [greedy.generate([p], [0], 8)[0] for p in prompts]
    assert [g.text for g in batched] == [g.text for g in single]
    sampled = LocalGenerator(LocalGeneratorConfig(type="local", path=str(tiny_lm)), tmp_path)
    first, again = sampled.generate(prompts, [5, 6], 8), sampled.generate(prompts, [5, 6], 8)
    other = sampled.generate(prompts, [9, 10], 8)
    assert [g.text for g in first] == [g.text for g in again] != [g.text for g in other]


def test_local_model_end_to_end_writes_report(tiny_lm, tmp_path):
    config = load_config(write_config(
        tmp_path, num_instructions=3, max_prompts=4, batch_size=2, max_new_tokens=16,
        seed_examples_per_prompt=1, generated_examples_per_prompt=0,
        generator={"type": "local", "path": str(tiny_lm)}))
    report = run_self_instruct(config)
    assert (report["prompts"], report["responses"], report["finished"]) == (4, 4, False)
    assert report["generator"] == f"local model {tiny_lm}"
    saved = json.loads((tmp_path / "out" / "gen.report.json").read_text())
    assert saved == report and set(saved["rejected"]) >= {"truncated", "not_novel"}
    state = json.loads((tmp_path / "out" / "gen.state.json").read_text())
    assert state["prompts_done"] == 4 and state["kept"] == report["kept"]


def test_a_local_vlm_generates_from_text_prompts(tiny_llava_path, tmp_path):
    from peftvlm.data.self_instruct.config import LocalGeneratorConfig
    from peftvlm.data.self_instruct.generators import LocalGenerator

    gen = LocalGenerator(LocalGeneratorConfig(type="local", path=str(tiny_llava_path),
                                              temperature=0), tmp_path)
    assert type(gen.model).__name__ == "LlavaForConditionalGeneration"
    assert gen._render("Describe the image.") == "USER: Describe the image. ASSISTANT:"
    outputs = gen.generate(["Describe the image.", "Name a colour."], [0, 1], 6)
    assert len(outputs) == 2 and all(isinstance(o.text, str) for o in outputs)


# --- the command line -----------------------------------------------------------------------

def test_cli_runs_against_a_server_and_reports_config_errors(tmp_path, serve, cli):
    server = serve(scripted)
    good = write_config(tmp_path, num_instructions=1, batch_size=1,
                        generator={"type": "openai", "url": server.url, "model": "m"})
    done = cli("data", "self-instruct", good)
    assert done.returncode == 0, done.stderr
    assert "kept 1/1" in done.stdout and (tmp_path / "out" / "gen.jsonl").exists()
    bad = cli("data", "self-instruct", good, "generator.colour=red")
    assert bad.returncode == 2
    assert "generator.colour: unknown key `colour`" in bad.stderr and "Traceback" not in bad.stderr
