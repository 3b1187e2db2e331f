"""The self-instruct loop: prompts -> generator -> parsed tasks -> filters -> rows, resumably.

Files, next to `output` (say `out.jsonl`):
  out.jsonl         kept rows in the trainer's format, append-only
  out.pool.jsonl    the same tasks as generated (instruction, input, answers, image), so a
                    resumed run rebuilds its duplicate/novelty pools and in-context examples
  out.state.json    what was committed: prompts done, rows kept, byte sizes, filter counts
  out.report.json   kept / rejected per filter, rewritten after every batch

A batch is committed by appending its rows and then replacing the state file atomically; a run
killed in between leaves bytes past the committed sizes, which the next run cuts off before it
redoes that batch. Each prompt's example sampling and each batch's generation are seeded from
(seed, prompt index), so a resumed run writes exactly what an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from peftvlm.data.self_instruct.config import SelfInstructConfig, VISUAL_TASK_TYPES
from peftvlm.data.self_instruct.filters import Filters, REASONS
from peftvlm.data.self_instruct.generators import build_generator
from peftvlm.data.self_instruct.prompts import (Candidate, Parsed, parse_text_response,
                                                parse_visual_response, text_prompt, visual_prompt)
from peftvlm.data.self_instruct.seeds import load_images, load_seed_tasks, render_context
from peftvlm.errors import DataError, RunError

STATE_VERSION = 1


@dataclass
class Paths:
    output: Path
    pool: Path
    state: Path
    report: Path

    @classmethod
    def for_output(cls, output: Path) -> Paths:
        stem = output.with_suffix("")
        return cls(output, Path(f"{stem}.pool.jsonl"), Path(f"{stem}.state.json"),
                   Path(f"{stem}.report.json"))

    def all(self) -> list[Path]:
        return [self.output, self.pool, self.state, self.report]


@dataclass
class Job:
    """One prompt and how to read its answer."""

    prompt: str
    parse: Callable[[str, bool], Parsed]


class SelfInstruct:
    """Holds the inputs, pools and counters of one run; `run()` drives it to the target."""

    def __init__(self, config: SelfInstructConfig, generator_factory=None):
        self.config = config
        self.paths = Paths.for_output(config.resolve(config.output))
        self.seeds = load_seed_tasks(config.resolve(config.seed_tasks))
        self.visual = config.mode == "visual"
        self.images = (load_images(config.resolve(config.images), self.paths.output.parent)
                       if self.visual else [])
        self.contexts = {im.image: render_context(im) for im in self.images}
        self.task_types = list(config.task_types or VISUAL_TASK_TYPES)
        self.seed_triples = [(s.instruction, _seed_input(s), s.output) for s in self.seeds]
        self._generator_factory = generator_factory
        self.kept: list[Candidate] = []

    # --- state --------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """What must not change between a run and its resumption."""
        data = self.config.model_dump(mode="json", exclude={"num_instructions", "max_prompts",
                                                             "generator"})
        gen = self.config.generator
        data["generator"] = [gen.type, getattr(gen, "path", None), getattr(gen, "model", None),
                             gen.temperature, gen.top_p]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def new_state(self) -> dict:
        return {"version": STATE_VERSION, "fingerprint": self.fingerprint(), "prompts_done": 0,
                "kept": 0, "output_bytes": 0, "pool_bytes": 0, "responses": 0, "candidates": 0,
                "unused_after_target": 0, "rejected": dict.fromkeys(REASONS, 0)}

    def open_state(self, overwrite: bool) -> dict:
        """A fresh state, or the committed one of an interrupted run (files cut back to it)."""
        paths = self.paths
        if overwrite:
            for path in paths.all():
                path.unlink(missing_ok=True)
        if not paths.state.exists():
            if paths.output.exists() and paths.output.stat().st_size:
                raise RunError(f"{paths.output} exists but has no state file {paths.state.name}",
                               hint="pass --overwrite to start again, or choose another output")
            paths.output.parent.mkdir(parents=True, exist_ok=True)
            state = self.new_state()
            # Written before any row, so even a kill inside the first batch can be resumed.
            _write_atomic(paths.state, json.dumps(state, indent=1) + "\n")
            return state
        state = json.loads(paths.state.read_text())
        if state.get("fingerprint") != self.fingerprint():
            raise RunError(f"{paths.state} was written with different settings than "
                           f"{self.config.source_path}",
                           hint="rerun with the same config (num_instructions and max_prompts "
                                "may change), or pass --overwrite to start again")
        _cut_to(paths.output, state["output_bytes"])
        _cut_to(paths.pool, state["pool_bytes"])
        return state

    def load_kept(self) -> None:
        if self.paths.pool.exists():
            lines = self.paths.pool.read_text(encoding="utf-8").splitlines()
            self.kept = [Candidate.from_meta(json.loads(line)) for line in lines if line]

    # --- prompts ------------------------------------------------------------------------

    def job(self, index: int) -> Job:
        """The prompt for global prompt number `index`, sampled from (seed, index) alone."""
        rng = random.Random(f"{self.config.seed}:{index}")
        return self._visual_job(index, rng) if self.visual else self._text_job(rng)

    def _text_job(self, rng: random.Random) -> Job:
        c = self.config
        examples = _sample(rng, self.seed_triples, c.seed_examples_per_prompt)
        examples += [(k.questions[0], k.input, k.turns[0][1])
                     for k in _sample(rng, self.kept, c.generated_examples_per_prompt)]
        rng.shuffle(examples)
        return Job(text_prompt(examples, c.tasks_per_prompt), parse_text_response)

    def _visual_job(self, index: int, rng: random.Random) -> Job:
        c = self.config
        image = self.images[index % len(self.images)]
        task_type = self.task_types[(index // len(self.images)) % len(self.task_types)]
        seeds = [(render_context(s.context), [(s.instruction, s.output)] +
                  [(f.instruction, f.output) for f in s.followups])
                 for s in self.seeds if s.task_type == task_type and s.context is not None]
        generated = [(self.contexts[k.image], k.turns) for k in self.kept
                     if k.task_type == task_type and k.image in self.contexts]
        examples = (_sample(rng, seeds, c.seed_examples_per_prompt)
                    + _sample(rng, generated, c.generated_examples_per_prompt))
        prompt = visual_prompt(task_type, examples, self.contexts[image.image], c.tasks_per_prompt)
        return Job(prompt, lambda text, cut: parse_visual_response(text, cut, task_type,
                                                                   image.image))

    # --- the loop -----------------------------------------------------------------------

    def filters(self) -> Filters:
        hint = [t for triple in self.seed_triples for t in triple]
        filters = Filters(self.config.filters, [(i, x) for i, x, _ in self.seed_triples],
                          per_image=self.visual, frequency_hint=hint)
        for cand in self.kept:
            filters.keep(cand)
        return filters

    def run(self, overwrite: bool = False, log: Callable[[str], None] = lambda s: None) -> dict:
        """Generate until `num_instructions` rows are kept or the prompt budget is spent."""
        c = self.config
        state = self.open_state(overwrite)
        self.load_kept()
        filters = self.filters()
        filters.counts = dict(state["rejected"])
        generator = None
        if state["prompts_done"]:
            log(f"resuming: {state['kept']} rows kept after {state['prompts_done']} prompts")
        while state["kept"] < c.num_instructions and state["prompts_done"] < c.prompt_budget():
            generator = generator or self._generator()
            self.run_batch(generator, filters, state)
            log(f"{state['prompts_done']} prompts: kept {state['kept']}/{c.num_instructions}")
        report = self.report(state, generator)
        _write_atomic(self.paths.report, json.dumps(report, indent=2) + "\n")
        return report

    def _generator(self):
        factory = self._generator_factory or build_generator
        return factory(self.config.generator, self.config.base_dir())

    def run_batch(self, generator, filters: Filters, state: dict) -> None:
        """Generate one batch, filter it, and commit its rows and the new state."""
        c = self.config
        first = state["prompts_done"]
        indices = range(first, min(first + c.batch_size, c.prompt_budget()))
        jobs = [self.job(i) for i in indices]
        outputs = generator.generate([j.prompt for j in jobs], [c.seed + i for i in indices],
                                     c.max_new_tokens)
        kept = []
        for job, out in zip(jobs, outputs):
            parsed = job.parse(out.text, out.truncated)
            filters.counts["truncated"] += parsed.truncated
            filters.counts["malformed"] += parsed.malformed
            state["candidates"] += len(parsed.candidates)
            for cand in parsed.candidates:
                if state["kept"] + len(kept) >= c.num_instructions:
                    state["unused_after_target"] += 1
                elif filters.check(cand):
                    kept.append(cand)
        state["responses"] += len(outputs)
        state["prompts_done"] = indices.stop
        self.commit(kept, filters, state)

    def commit(self, kept: list[Candidate], filters: Filters, state: dict) -> None:
        state["output_bytes"] = _append_lines(self.paths.output, [k.to_row() for k in kept])
        state["pool_bytes"] = _append_lines(self.paths.pool, [k.to_meta() for k in kept])
        state["kept"] += len(kept)
        state["rejected"] = dict(filters.counts)
        self.kept += kept
        _write_atomic(self.paths.state, json.dumps(state, indent=1) + "\n")
        _write_atomic(self.paths.report, json.dumps(self.report(state, None), indent=2) + "\n")

    def report(self, state: dict, generator) -> dict:
        c = self.config
        done = state["kept"] >= c.num_instructions
        return {
            "config": str(c.source_path) if c.source_path else None,
            "output": str(self.paths.output), "mode": c.mode,
            "generator": generator.describe() if generator else c.generator.type,
            "target": c.num_instructions, "kept": state["kept"],
            "prompts": state["prompts_done"], "responses": state["responses"],
            "candidates": state["candidates"], "rejected": state["rejected"],
            "unused_after_target": state["unused_after_target"], "finished": done,
            "stopped_because": "target reached" if done else (
                "prompt budget (max_prompts) spent" if state["prompts_done"] >= c.prompt_budget()
                else "not finished"),
        }


def run_self_instruct(config: SelfInstructConfig, overwrite: bool = False,
                      log: Callable[[str], None] = lambda s: None, generator_factory=None) -> dict:
    """Run (or resume) the pipeline a config describes; returns the report."""
    return SelfInstruct(config, generator_factory).run(overwrite=overwrite, log=log)


def _seed_input(seed) -> str:
    """A seed's input as a text-mode example shows it: image annotations, then its own input."""
    parts = [render_context(seed.context)] if seed.context else []
    return "\n".join(parts + ([seed.input] if seed.input else []))


def _sample(rng: random.Random, items: list, k: int) -> list:
    return rng.sample(items, min(k, len(items)))


def _append_lines(path: Path, records: list[dict]) -> int:
    """Append JSON lines durably; returns the file's new size."""
    with path.open("ab") as f:
        for record in records:
            f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())
        return f.tell()


def _cut_to(path: Path, size: int) -> None:
    """Drop bytes a killed run wrote after its last committed batch."""
    actual = path.stat().st_size if path.exists() else 0
    if actual < size:
        raise DataError(f"{path} is shorter ({actual} bytes) than its state says ({size})",
                        hint="the file was edited or replaced; pass --overwrite to start again")
    if actual > size:
        with path.open("r+b") as f:
            f.truncate(size)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
