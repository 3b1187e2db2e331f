"""Export: merge equality per method, the "merge did nothing" guard, plain reloading in a fresh
process, the model card, Hub pushes against a local endpoint, W&B artifacts, and CLI errors.

Runs are built directly (method applied to the tiny LLaVA, adapter weights perturbed so they are
non-zero) so each test takes seconds; one slow test goes through `peftvlm train` for real.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from peftvlm.errors import ExportError

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "hf_exportTestSecret1234567890"


# --- building runs ---------------------------------------------------------------------------

def recipe_dict(method_name: str, **extra) -> dict:
    settings = {"name": method_name, "r": 4}
    if method_name != "vera":
        settings["lora_alpha"] = 8
    data = {"name": f"tiny-{method_name}", "model": {"id": "tiny-llava"}, "method": settings,
            "data": {"synthetic": {"name": "colour-vqa", "train_size": 8, "eval_size": 4}},
            "eval": {"metrics": ["exact_match"]}}
    for key, value in extra.items():
        data[key] = value
    return data


def make_run(run_dir: Path, method_name: str, **extra) -> Path:
    """A finished run folder whose adapter is non-zero, without spending time on training."""
    import torch

    from peftvlm.recipe.load import validate_recipe_dict
    from peftvlm.registry import get_method
    from peftvlm.summary import parameter_counts
    from peftvlm.trainers.generative import load_model_with_method

    recipe = validate_recipe_dict(recipe_dict(method_name, **extra))
    torch.manual_seed(0)
    loaded, model = load_model_with_method(recipe, get_method(method_name))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    run_dir.mkdir(parents=True)
    model.save_pretrained(run_dir / "adapter")
    loaded.processor.save_pretrained(run_dir / "adapter")
    (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
    trainable, total = parameter_counts(model)
    summary = {"name": recipe.name, "method": method_name, "model": "tiny-llava", "family": "llava",
               "trainable_params": trainable, "total_params": total, "train_runtime_s": 1.5,
               "global_step": 3, "final_loss": 2.5, "hardware": "cpu",
               "eval": {"exact_match": {"before": 0.25, "after": 0.75}},
               "data": {"train_rows": 8, "eval_rows": 4}}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("runs") / "lora", "lora")


@pytest.fixture(scope="session")
def merged_export(lora_run, tmp_path_factory):
    from peftvlm.export import export_run

    out = tmp_path_factory.mktemp("exports") / "merged"
    report = export_run(lora_run, merge=True, out=out, max_shard_size="200KB", log=lambda m: None)
    return out, report


@pytest.fixture(scope="session")
def adapter_export(lora_run, tmp_path_factory):
    from peftvlm.export import export_run

    out = tmp_path_factory.mktemp("exports") / "adapter"
    return out, export_run(lora_run, out=out, log=lambda m: None)


# --- merge equality ----------------------------------------------------------------------------

@pytest.mark.parametrize("method, extra", [
    ("lora", {}), ("dora", {}), ("vera", {}), ("qlora", {}),
    ("lora", {"modules_to_save": ["projector"]}),  # a fully trained projector is merged too
], ids=["lora", "dora", "vera", "qlora", "lora+projector"])
def test_merged_logits_match_adapter_model(method, extra, tmp_path):
    from safetensors import safe_open

    from peftvlm.export import export_run

    settings = {**recipe_dict(method)["method"], **extra}
    run = make_run(tmp_path / "run", method, method=settings)
    report = export_run(run, merge=True, out=tmp_path / "out", log=lambda m: None)
    checks = report["checks"]
    assert report["passed"] and report["kind"] == "merged"
    assert checks["logits"]["max_abs_diff"] <= 1e-4 and checks["logits"]["positions"] > 10
    assert checks["logits"]["examples"] == "held-out rows"
    assert checks["weights_changed"]["changed_after_merge"] == 14  # 7 linears x 2 layers
    assert checks["generation"]["new_tokens"] > 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config  # QLoRA merges into the unquantized base
    assert report["base_quantized_in_training"] == (method == "qlora")
    if method == "qlora":  # the gap to the model as trained (4-bit base) is reported, not zero
        gap = report["vs_quantized_training_model"]
        assert gap["max_abs_diff"] > checks["logits"]["max_abs_diff"]
        assert 0 <= gap["top1_agreement"] <= 1
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert not [k for k in keys if "lora" in k or "vera" in k or "base_layer" in k]
    on_disk = json.loads((tmp_path / "out" / "export_report.json").read_text())
    assert on_disk["checks"]["logits"]["max_abs_diff"] == checks["logits"]["max_abs_diff"]


@pytest.mark.parametrize("method", ["lora", "dora", "vera", "qlora"])
@pytest.mark.parametrize("tiny", ["tiny-qwen2-vl", "tiny-smolvlm"])
def test_merge_equality_on_other_families(tiny, method, tmp_path):
    from peftvlm.export import export_run

    run = make_run(tmp_path / "run", method, model={"id": tiny})
    report = export_run(run, merge=True, out=tmp_path / "out", log=lambda m: None)
    checks = report["checks"]
    assert report["passed"], report
    assert checks["logits"]["max_abs_diff"] <= 1e-4 and checks["logits"]["positions"] > 4
    assert checks["weights_changed"]["changed_after_merge"] > 0
    assert checks["generation"]["new_tokens"] > 0


def test_merged_export_is_sharded_and_complete(merged_export):
    out, report = merged_export
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors.index.json" in names
    assert len([n for n in names if n.endswith(".safetensors")]) > 1
    assert {"config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja",
            "processor_config.json", "README.md", "export_report.json"} <= names
    assert report["checks"]["logits"]["max_abs_diff"] <= 1e-4
    # the export serves with the template that trained: the checkpoint's published one
    from peftvlm.families.base import read_template

    assert (out / "chat_template.jinja").read_text() == read_template("llava-1.5")


def test_bfloat16_merge_within_stated_tolerance(lora_run, tmp_path):
    from peftvlm.export import export_run

    report = export_run(lora_run, merge=True, dtype="bfloat16", out=tmp_path / "bf16",
                        log=lambda m: None)
    logits = report["checks"]["logits"]
    assert report["dtype"] == "bfloat16" and logits["passed"]
    assert 0 < logits["max_abs_diff"] <= logits["tolerance"]
    assert "max |logit|" in logits["tolerance_rule"]
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


def test_merge_that_did_nothing_is_caught(lora_run, tmp_path, monkeypatch):
    import peftvlm.export as export

    # peft's unload() drops the adapter without folding it in: the classic silent failure.
    monkeypatch.setattr(export, "merge_adapter", lambda model: model.unload())
    with pytest.raises(ExportError) as err:
        export.export_run(lora_run, merge=True, out=tmp_path / "out", log=lambda m: None)
    assert "merge did nothing: 14 of 14 adapted modules" in err.value.message
    assert "logits differ from the adapter model" in err.value.message
    report = json.loads((tmp_path / "out" / "export_report.json").read_text())
    assert report["passed"] is False and report["checks"]["weights_changed"]["passed"] is False


def test_all_zero_adapter_is_reported(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from peftvlm.export import export_run

    run = make_run(tmp_path / "run", "lora")
    path = run / "adapter" / "adapter_model.safetensors"
    save_file({k: torch.zeros_like(v) for k, v in load_file(path).items()}, path)
    with pytest.raises(ExportError, match="the adapter is all zeros"):
        export_run(run, merge=True, out=tmp_path / "out", log=lambda m: None)
    with pytest.raises(ExportError, match="does not change the base model's logits"):
        export_run(run, out=tmp_path / "adapter-out", log=lambda m: None)


# --- fresh processes and the model card ----------------------------------------------------------

def card_snippet(card: str) -> str:
    section = card.split("## How to load", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def run_fresh(code: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    """Run code in a new interpreter that cannot import peftvlm (plain libraries only)."""
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    clean.update(HF_HUB_OFFLINE="1", **env)
    return subprocess.run([sys.executable, "-c", "import sys; sys.path = [p for p in sys.path "
                           f"if p not in ('', {str(ROOT)!r})]\n" + code],
                          cwd=cwd, env=clean, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_exports_load_with_plain_libraries_in_a_fresh_process(merged_export, adapter_export,
                                                               lora_run, tmp_path):
    """One new interpreter without peftvlm runs both model cards' snippets, and computes the
    merged folder's logits, which must equal the adapter model's computed here."""
    import torch
    from peft import PeftModel

    from peftvlm.export import load_unquantized_base, read_run
    from peftvlm.export.checks import encode_rows, logits_of, probe_rows

    (merged, _), (adapter, adapter_report) = merged_export, adapter_export
    merged_code = card_snippet((merged / "README.md").read_text())
    adapter_code = card_snippet((adapter / "README.md").read_text())
    assert f"model_id = {os.path.relpath(merged, lora_run)!r}" in merged_code  # no local paths
    assert "PeftModel.from_pretrained(base, adapter_id)" in adapter_code
    assert adapter_report["checks"]["adapter_effect"]["max_abs_diff_from_base"] > 0

    run = read_run(lora_run)
    loaded = load_unquantized_base(run.recipe, "float32")
    rows, _ = probe_rows(run.recipe, loaded.family)
    batch = encode_rows(loaded.processor, loaded.family, rows)
    expected = logits_of(PeftModel.from_pretrained(loaded.model, run.adapter_dir), batch)
    torch.save(batch, tmp_path / "batch.pt")
    script = (
        f"exec({merged_code!r}, merged := {{}})\n"
        f"exec({adapter_code!r}, adapted := {{}})\n"
        "assert not [m for m in sys.modules if m.startswith('peftvlm')]\n"
        "print('MERGED', type(merged['model']).__name__,\n"
        "      next(merged['model'].parameters()).dtype)\n"
        "print('ADAPTER', type(adapted['model']).__name__, sorted(adapted['model'].peft_config))\n"
        f"import torch\nbatch = torch.load({str(tmp_path / 'batch.pt')!r})\n"
        "with torch.no_grad():\n    logits = merged['model'].eval()(**batch).logits\n"
        f"torch.save(logits[batch['attention_mask'].bool()], {str(tmp_path / 'logits.pt')!r})\n")
    result = run_fresh(script, lora_run)  # the card's paths are relative to the run folder
    assert result.returncode == 0, result.stderr[-2000:]
    assert "MERGED LlavaForConditionalGeneration torch.float32" in result.stdout
    assert "ADAPTER PeftModel ['default']" in result.stdout
    actual = torch.load(tmp_path / "logits.pt")
    assert float((actual - expected).abs().max()) <= 1e-4


def card_metadata(card: str) -> dict:
    return yaml.safe_load(card.split("---\n")[1])


def test_model_card_content(merged_export, adapter_export):
    card = (merged_export[0] / "README.md").read_text()
    meta = card_metadata(card)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-text-to-text"
    assert {"peftvlm", "lora", "llava", "merged"} <= set(meta["tags"])
    assert "base_model" not in meta  # a built-in tiny model is not a Hub id
    assert "| exact_match | 0.2500 | 0.7500 |" in card
    assert re.search(r"Trainable parameters: [\d,]+ of [\d,]+ \([\d.]+%\)", card)
    assert "3 steps in 1.5 s on cpu" in card
    assert "name: lora" in card and "max_new_tokens: 16" in card  # the resolved recipe
    assert "| logits | pass |" in card and "| weights_changed | pass |" in card
    adapter_meta = card_metadata((adapter_export[0] / "README.md").read_text())
    assert adapter_meta["library_name"] == "peft" and "adapter" in adapter_meta["tags"]


def test_exports_carry_no_local_paths(merged_export, adapter_export, lora_run):
    """Card (recipe, snippet), report and adapter config: paths relative to the run folder."""
    from peftvlm.models import cache_dir
    from peftvlm.export.card import local_path_leaks

    for out, report in (merged_export, adapter_export):
        assert report["checks"]["no_local_paths"]["passed"]
        assert local_path_leaks(out, [Path.home(), cache_dir(), lora_run, out]) == []
        card = (out / "README.md").read_text()
        assert "base_dir" not in card and "/tmp/" not in card
    planted = adapter_export[0] / "notes.txt"
    planted.write_text(f"trained in {lora_run.resolve()}/checkpoints\n")
    try:
        assert local_path_leaks(adapter_export[0], [lora_run]) == [
            f"notes.txt: {lora_run.resolve()}"]
    finally:
        planted.unlink()


def test_card_carries_license_and_base_from_local_base(tmp_path):
    from peftvlm.export import export_run
    from peftvlm.models import tiny_model_path

    base = tmp_path / "base"
    shutil.copytree(tiny_model_path("tiny-llava"), base)
    (base / "README.md").write_text("---\nlicense: mit\n---\n# a base\n")
    run = make_run(tmp_path / "run", "qlora", model={"id": str(base)})
    export_run(run, merge=True, out=tmp_path / "out", log=lambda m: None)
    card = (tmp_path / "out" / "README.md").read_text()
    assert card_metadata(card)["license"] == "mit"
    assert "quantization_config = BitsAndBytesConfig(load_in_4bit=True" in card
    assert "'model.vision_tower', 'model.multi_modal_projector', 'lm_head'" in card


def test_card_metadata_for_hub_models(monkeypatch):
    from types import SimpleNamespace

    from peftvlm.export.card import card_metadata as metadata
    from peftvlm.recipe.load import validate_recipe_dict

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the license lookup must not touch the network
    recipe = validate_recipe_dict(recipe_dict("lora", model={"id": "llava-hf/llava-1.5-7b-hf"}))
    run = SimpleNamespace(recipe=recipe, summary={"family": "llava"})
    meta = yaml.safe_load(metadata(run, {"kind": "merged"}).to_yaml())
    assert meta["base_model"] == "llava-hf/llava-1.5-7b-hf"
    assert meta["base_model_relation"] == "merge" and meta["library_name"] == "transformers"


# --- the Hub -----------------------------------------------------------------------------------

class FakeHub:
    """A local Hub endpoint answering the calls upload_folder makes; records every request."""

    def __init__(self, fail: dict | None = None):
        self.requests, self.files, self.repos, self.validated = [], {}, [], []
        self.fail = dict(fail or {})  # path fragment -> list of statuses to answer first
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hub.requests.append({"method": "POST", "path": self.path,
                                     "headers": {k.lower(): v for k, v in self.headers.items()},
                                     "body": body})
                for fragment, statuses in hub.fail.items():
                    if fragment in self.path and statuses:
                        return self.answer(statuses.pop(0), {"error": "simulated"})
                if self.path == "/api/validate-yaml":  # the Hub checks README metadata
                    hub.validated.append(json.loads(body))
                    return self.answer(200, {"errors": [], "warnings": []})
                if self.path == "/api/repos/create":
                    spec = json.loads(body)
                    hub.repos.append(spec)
                    repo = f"{spec.get('organization') or 'user'}/{spec['name']}"
                    return self.answer(200, {"url": f"{hub.endpoint}/{repo}", "name": repo})
                if "/preupload/" in self.path:
                    files = json.loads(body)["files"]
                    return self.answer(200, {"files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                        for f in files]})
                if "/commit/" in self.path:
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            value = item["value"]
                            hub.files[value["path"]] = base64.b64decode(value["content"])
                    repo = self.path.split("/api/models/", 1)[1].split("/commit/", 1)[0]
                    return self.answer(200, {"commitUrl": f"{hub.endpoint}/{repo}/commit/abc",
                                             "commitOid": "a" * 40})
                self.answer(404, {"error": "not found"})

            def answer(self, status, data):
                payload = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def token_leaks(self) -> list[str]:
        """Everywhere the token was sent other than the Authorization header."""
        leaks = []
        for r in self.requests:
            if TOKEN in r["path"] or TOKEN.encode() in r["body"]:
                leaks.append(r["path"])
            leaks += [f"header {k}" for k, v in r["headers"].items()
                      if TOKEN in v and k.lower() != "authorization"]
        return leaks


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A FakeHub wired in as the Hub endpoint, with the token in HF_TOKEN only."""
    from huggingface_hub import constants

    server = FakeHub()
    monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    yield server
    server.close()


def test_push_uploads_exact_files_and_keeps_token_secret(hub, merged_export, caplog, capsys):
    from peftvlm.export.hub import push_folder

    out, _ = merged_export
    logs = []
    result = push_folder(out, "me/tiny-merged", private=True, commit_message="peftvlm export of "
                         "run lora (merged)", log=logs.append)
    local = {p.name: p.read_bytes() for p in out.iterdir()}
    assert hub.files == local  # every file, byte for byte, nothing else
    assert hub.repos[0]["visibility"] == "private" and hub.repos[0]["name"] == "tiny-merged"
    commit_header = json.loads(hub.requests[-1]["body"].decode().splitlines()[0])
    assert commit_header["value"]["summary"] == "peftvlm export of run lora (merged)"
    assert result["commit"] == "a" * 40
    auth = [r["headers"].get("authorization") for r in hub.requests]
    assert auth and all(a == f"Bearer {TOKEN}" for a in auth)
    assert hub.token_leaks() == []
    captured = capsys.readouterr()
    everything = "\n".join(logs) + caplog.text + captured.out + captured.err + json.dumps(result)
    assert TOKEN not in everything
    assert all(TOKEN.encode() not in p.read_bytes() for p in out.iterdir())
    assert hub.validated and TOKEN not in json.dumps(hub.validated)


@pytest.mark.parametrize("status, message", [
    (401, "the Hub rejected the token (HTTP 401)"),
    (403, "the token has no permission to write there (HTTP 403)"),
])
def test_push_permission_errors(hub, adapter_export, status, message):
    from peftvlm.export.hub import push_folder

    hub.fail["/api/repos/create"] = [status]
    with pytest.raises(ExportError) as err:
        push_folder(adapter_export[0], "me/x", commit_message="m", log=lambda m: None)
    assert message in str(err.value) and TOKEN not in str(err.value)
    assert len(hub.requests) == 1  # not retried


def test_push_retries_transient_failures(hub, adapter_export):
    from peftvlm.export.hub import push_folder

    hub.fail["/api/repos/create"] = [503]
    hub.fail["/commit/"] = [502]
    logs = []
    push_folder(adapter_export[0], "me/x", commit_message="m", log=logs.append, backoff_s=0)
    assert set(hub.files) == {p.name for p in adapter_export[0].iterdir()}
    assert [m.split(";")[1].strip() for m in logs if "retrying" in m] == \
        ["retrying in 0 s (1/3)", "retrying in 0 s (1/3)"]


def test_push_network_down(adapter_export, monkeypatch):
    import socket

    from huggingface_hub import constants

    from peftvlm.export.hub import push_folder

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(ExportError, match=f"cannot reach http://127.0.0.1:{port}"):
        push_folder(adapter_export[0], "me/x", commit_message="m", log=lambda m: None,
                    backoff_s=0)


# --- W&B ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_wandb_offline_artifacts(tmp_path, monkeypatch):
    from peftvlm.export import export_run

    monkeypatch.setenv("WANDB_SILENT", "true")
    run = make_run(tmp_path / "run", "lora",
                   tracking={"wandb": {"mode": "offline", "project": "pv-test"}})
    summary = json.loads((run / "summary.json").read_text())
    summary["wandb"] = {"id": "abc123", "project": "pv-test", "url": None, "mode": "offline"}
    (run / "summary.json").write_text(json.dumps(summary))
    report = export_run(run, merge=True, wandb_merged=True, out=tmp_path / "out",
                        log=lambda m: None)
    assert report["wandb_artifacts"] == ["tiny-lora-adapter", "tiny-lora-merged"]
    import wandb

    wandb.teardown()  # finish() returns before wandb-core has flushed the offline run file
    records = b"".join(p.read_bytes() for p in (run / "wandb").glob("offline-run-*/*.wandb"))
    assert b"tiny-lora-adapter" in records and b"tiny-lora-merged" in records
    assert b"adapter_model.safetensors" in records and b"config.json" in records
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Logged to W&B offline (project `pv-test`, run id `abc123`)" in card


# --- the extension point for methods outside peft -------------------------------------------

def export_adapter(run_dir, adapter_dir, out_dir, merge):
    """A stand-in for a method's own exporter (its module defines this function)."""
    (out_dir / "prompt.safetensors").write_bytes(b"weights")
    ok = (adapter_dir / "prompt.json").exists()
    return {"kind": "adapter", "method": "coop-like",
            "checks": {"reload": {"passed": ok, "error": "prompt.json missing"}}}


@pytest.fixture
def dual_encoder_lora(monkeypatch):
    """Pretend `lora` is a dual-encoder method whose module is this test file."""
    from peftvlm.registry import METHODS, MethodInfo, get_method

    info = get_method("lora")
    monkeypatch.setitem(METHODS, "lora", MethodInfo("lora", info.config_cls,
                                                    f"{__name__}:export_adapter",
                                                    ("dual_encoder",), info.summary))


def test_custom_method_exporter_goes_through_card_and_checks(fake_run, dual_encoder_lora,
                                                             tmp_path):
    from peftvlm.export import export_run

    (fake_run / "adapter" / "prompt.json").write_text("{}")
    report = export_run(fake_run, out=tmp_path / "out", log=lambda m: None)
    assert report["passed"] and (tmp_path / "out" / "prompt.safetensors").exists()
    assert "| reload | pass |" in (tmp_path / "out" / "README.md").read_text()
    (fake_run / "adapter" / "prompt.json").unlink()
    with pytest.raises(ExportError, match="reload: prompt.json missing"):
        export_run(fake_run, out=tmp_path / "out", log=lambda m: None)


# --- the CLI -----------------------------------------------------------------------------------

@pytest.fixture
def fake_run(tmp_path):
    """A run folder with the files export reads before loading any model."""
    from peftvlm.recipe.load import validate_recipe_dict

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "recipe.yaml").write_text(validate_recipe_dict(recipe_dict("lora")).to_yaml())
    (run / "summary.json").write_text("{}")
    return run


def test_cli_missing_run(tmp_path, cli):
    result = cli("export", str(tmp_path / "nope"))
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: run folder {tmp_path / 'nope'} does not exist")
    assert "Traceback" not in result.stderr


def test_cli_unfinished_run(fake_run, cli_in_process):
    (fake_run / "summary.json").unlink()
    result = cli_in_process("export", str(fake_run))  # main() in-process, as below
    assert result.returncode == 2
    assert "has no summary.json: the run is unfinished" in result.stderr
    assert "Traceback" not in result.stderr


def test_damaged_summary_is_one_clear_error(fake_run):
    from peftvlm.export import export_run

    (fake_run / "summary.json").write_text('{"name": ')
    with pytest.raises(ExportError, match="summary.json is not valid JSON"):
        export_run(fake_run, dry_run=True, log=lambda m: None)


def test_cli_unknown_dtype(fake_run, cli_in_process):
    result = cli_in_process("export", str(fake_run), "--merge", "--dtype", "float8")
    assert result.returncode == 2
    assert "error: unknown dtype 'float8' for the export" in result.stderr
    assert "float32, bfloat16, float16" in result.stderr and "Traceback" not in result.stderr


def test_cli_dtype_needs_merge(fake_run, cli_in_process):
    result = cli_in_process("export", str(fake_run), "--dtype", "bfloat16")
    assert result.returncode == 2 and "--dtype applies to merged exports only" in result.stderr


def test_probe_falls_back_to_a_drawn_image_when_data_is_unreadable(tmp_path, monkeypatch):
    from peftvlm.export.checks import probe_rows
    from peftvlm.families import get_family
    from peftvlm.recipe.load import validate_recipe_dict

    monkeypatch.chdir(tmp_path)  # relative data paths resolve here, where nothing exists
    recipe = validate_recipe_dict({**recipe_dict("lora"), "data": {"train": "gone.jsonl"}})
    rows, source = probe_rows(recipe, get_family("llava"))
    assert source.startswith("a drawn probe image") and len(rows) == 1
    assert rows[0]["images"][0].size == (32, 32)
    assert rows[0]["messages"][0]["content"][1]["text"] == "What color is the shape?"


def test_cli_push_without_token(fake_run, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    env["HF_HOME"] = str(tmp_path / "hf-home")
    result = subprocess.run([sys.executable, "-m", "peftvlm", "export", str(fake_run),
                             "--push-to-hub", "me/x", "--dry-run"], capture_output=True, text=True,
                            env={**env, "PYTHONPATH": str(ROOT)}, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert "no Hugging Face token found" in result.stderr and "HF_TOKEN" in result.stderr


def test_cli_dry_run_and_out_dir_safety(fake_run, tmp_path, cli_in_process):
    result = cli_in_process("export", str(fake_run), "--merge", "--dtype", "bfloat16",
                            "--dry-run")
    assert result.returncode == 0, result.stderr
    assert re.search(r"merge\s+True", result.stdout) and re.search(r"dtype\s+bfloat16",
                                                                   result.stdout)
    assert not (fake_run / "merged").exists()  # a dry run writes nothing
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    result = cli_in_process("export", str(fake_run), "--out", str(mine), "--dry-run")
    assert result.returncode == 2 and "exists and is not an earlier export" in result.stderr
    assert (mine / "notes.txt").read_text() == "keep me"


@pytest.mark.slow
def test_train_then_export_and_push_through_the_cli(tmp_path, cli):
    """`peftvlm train` with export.merge + push_to_hub: trains, merges, checks, pushes."""
    server = FakeHub()
    try:
        env = {"HF_ENDPOINT": server.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": TOKEN,
               "HF_HOME": str(tmp_path / "hf-home")}
        result = cli("train", "quickstart", "-o", str(tmp_path / "run"), "train.max_steps=3",
                     "data.synthetic.train_size=48", "data.synthetic.eval_size=8",
                     "export.merge=true", "export.push_to_hub=me/quick", "export.private=false",
                     env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        out = tmp_path / "run" / "merged"
        report = json.loads((out / "export_report.json").read_text())
        assert report["passed"] and report["hub"]["repo_id"] == "me/quick"
        assert report["checks"]["logits"]["max_abs_diff"] <= 1e-4
        pushed = {name: data for name, data in server.files.items()}
        local = {p.name: p.read_bytes() for p in out.iterdir()}
        local.pop("export_report.json")  # rewritten after the push to record it
        pushed.pop("export_report.json")
        assert pushed == local
        assert server.repos[0]["visibility"] == "public"
        assert "model_id = 'me/quick'" in local["README.md"].decode()
        assert server.token_leaks() == []
        assert TOKEN not in result.stdout + result.stderr
        assert not [p for p in (tmp_path / "run").rglob("*")
                    if p.is_file() and TOKEN.encode() in p.read_bytes()]
    finally:
        server.close()
