"""export.py space: the folder is a complete Gradio Space that runs on its own, and --push hands it to
huggingface_hub (recorded, never sent: tests do not reach the network)."""

import ast
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from huggingface_hub import RepoCard
from inference_fixtures import DIGITS, ROOT, a_val_image, demo_checkpoint  # noqa: F401  (a fixture)
from safetensors import safe_open

import evaluate
import export
import inference
import predict
from checkpoint import read_checkpoint

APP_MODULES = {"app.py", "inference.py", "data.py", "model.py", "checkpoint.py", "dataset_paths.py"}
OTHER_FILES = {"README.md", "requirements.txt", "class_names.json", "LICENSE", "model.safetensors"}
DIGIT_NAMES = [f"digit_{i}" for i in range(10)]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = export.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def export_space(capsys, checkpoint, out, *extra) -> dict:
    code, stdout, err = run(capsys, "space", "--checkpoint", checkpoint, "--out", out, "--json", *extra)
    assert code == 0, err
    return json.loads(stdout)


def predict_top5(capsys, checkpoint, image) -> list[dict]:
    code = predict.main([str(image), "--checkpoint", str(checkpoint), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)["predictions"]


def module_level_imports(path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_the_folder_holds_the_app_its_modules_and_the_weights_alone(demo_checkpoint, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "space"
    result = export_space(capsys, demo_checkpoint, out)
    assert result["max_abs_diff"] == 0 and result["precision"] == "fp32" and result["space_url"] is None
    # The app and exactly what it imports: found by reading the imports, and nothing of training.
    assert {p.name for p in export.local_modules(ROOT / "app.py")} == APP_MODULES
    assert {p.name for p in out.iterdir()} == APP_MODULES | OTHER_FILES == set(result["files"])
    assert all((out / name).read_bytes() == (ROOT / name).read_bytes() for name in APP_MODULES)

    # The weights: the model's tensors, bit for bit, nothing else; the metadata describes them.
    trained = read_checkpoint(demo_checkpoint)["model"]
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(trained)
        assert all(torch.equal(f.get_tensor(k), trained[k]) for k in trained)
    assert json.loads(meta["class_names"]) == DIGIT_NAMES and meta["image_size"] == "32"
    assert meta["arch"] == "resnet14_tiny" and meta["precision"] == "fp32"
    assert json.loads((out / "class_names.json").read_text()) == DIGIT_NAMES

    # The front matter, read by huggingface_hub's own parser as the Hub reads it.
    card = RepoCard.load(out / "README.md").data.to_dict()
    assert card["sdk"] == "gradio" and card["app_file"] == "app.py" and card["title"]
    assert card["sdk_version"] == importlib.metadata.version("gradio") and card["license"] == "mit"
    assert len(card["short_description"]) <= 60  # the Hub refuses longer ones

    # requirements.txt: CPU wheels, and a line for every package the copied modules import at load time.
    lines = [line for line in (out / "requirements.txt").read_text().splitlines() if not line.startswith("#")]
    assert lines[0] == "--extra-index-url https://download.pytorch.org/whl/cpu"
    listed = {line.split(">")[0].split("=")[0].split("<")[0] for line in lines[1:]}
    assert listed == set(export.SPACE_PACKAGES)
    distributions = importlib.metadata.packages_distributions()
    local = {name.removesuffix(".py") for name in APP_MODULES}
    third_party = set().union(*(module_level_imports(out / n) for n in APP_MODULES)) - local - sys.stdlib_module_names
    assert {distributions[m][0].lower() for m in third_party} <= listed, third_party

    # A folder that already holds files is refused: every file in it would be uploaded.
    code, _, err = run(capsys, "space", "--checkpoint", demo_checkpoint, "--out", out)
    assert code == 2 and "not an empty folder" in err and len(err.strip().splitlines()) == 1


def test_the_weights_file_alone_serves_every_tool(demo_checkpoint, tmp_path, capsys):  # noqa: F811
    weights = tmp_path / "space" / "model.safetensors"
    export_space(capsys, demo_checkpoint, weights.parent)
    lonely = tmp_path / "elsewhere" / "weights.safetensors"  # no folder, no class_names.json, another name
    lonely.parent.mkdir()
    shutil.copyfile(weights, lonely)
    for image in (a_val_image(3), a_val_image(7)):
        assert predict_top5(capsys, lonely, image) == predict_top5(capsys, demo_checkpoint, image)
    code = evaluate.main(["--checkpoint", str(lonely), "--data-dir", str(DIGITS), "--json", "--workers", "0"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert abs(json.loads(out)["acc1"] - read_checkpoint(demo_checkpoint)["history"][-1]["val_acc1"]) <= 1e-6


def test_fp16_halves_the_download_and_keeps_the_predictions(demo_checkpoint, tmp_path, capsys):  # noqa: F811
    fp32 = export_space(capsys, demo_checkpoint, tmp_path / "fp32")
    fp16 = export_space(capsys, demo_checkpoint, tmp_path / "fp16", "--fp16")
    assert fp16["weights_bytes"] < 0.55 * fp32["weights_bytes"]
    assert fp16["precision"] == "fp16" and 0 < fp16["max_abs_diff"] <= export.FP16_TOLERANCE
    with safe_open(str(tmp_path / "fp16" / "model.safetensors"), framework="pt") as f:
        dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}
    assert {d for k, d in dtypes.items() if not k.endswith("num_batches_tracked")} == {torch.float16}
    clf = inference.load_classifier(tmp_path / "fp16" / "model.safetensors")
    assert next(clf.model.parameters()).dtype == torch.float32  # widened on load: the app computes in fp32
    image = a_val_image(3)
    top = [p["label"] for p in predict_top5(capsys, tmp_path / "fp16" / "model.safetensors", image)]
    assert top[0] == predict_top5(capsys, demo_checkpoint, image)[0]["label"]


def test_the_copied_folder_runs_with_nothing_from_the_repository(demo_checkpoint, tmp_path, capsys):  # noqa: F811
    shutil.copytree(export_space(capsys, demo_checkpoint, tmp_path / "space")["output"], tmp_path / "copy")
    image = a_val_image(3)
    # As a Space starts it: from its own folder, no --checkpoint, no CHECKPOINT_PATH, no PYTHONPATH.
    script = textwrap.dedent(f"""
        import json, sys
        import app, inference
        clf, status = app.load_for_page(app.default_checkpoint())
        top = clf.top_k(inference.load_image({str(image)!r}, clf.image_size)[None])[0]
        files = [m.__file__ for m in list(sys.modules.values()) if getattr(m, "__file__", None)]
        print(json.dumps({{"status": status, "top": top, "files": files, "path": sys.path}}))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CHECKPOINT_PATH")}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path / "copy", env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert "from `model.safetensors`" in result["status"]
    # The installed packages may live in a virtual environment inside the repository folder (.ci/run makes one).
    def repository_code(path):
        return path.startswith(str(ROOT)) and not path.startswith(sys.prefix)

    assert not [f for f in result["files"] if repository_code(f)]
    assert not [p for p in result["path"] if repository_code(p)]
    assert {os.path.basename(f) for f in result["files"] if f.startswith(str(tmp_path / "copy"))} >= APP_MODULES
    expected = predict_top5(capsys, demo_checkpoint, image)
    assert [(label, p) for label, p in result["top"]] == [(p["label"], p["probability"]) for p in expected]


class RecordingHfApi:
    calls: list = []
    fail: Exception | None = None

    def create_repo(self, *args, **kwargs):
        self.calls.append(("create_repo", args, kwargs))
        if self.fail:
            raise self.fail

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", (), kwargs))


def test_push_uploads_the_folder_to_a_gradio_space(demo_checkpoint, tmp_path, capsys, monkeypatch):  # noqa: F811
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHfApi)
    monkeypatch.setattr(RecordingHfApi, "calls", [])
    out = tmp_path / "space"
    result = export_space(capsys, demo_checkpoint, out, "--push", "someone/digits-demo")
    assert result["space_url"] == "https://huggingface.co/spaces/someone/digits-demo"
    (_, args, create), (_, _, upload) = RecordingHfApi.calls
    assert args == ("someone/digits-demo",) and create["repo_type"] == "space" and create["space_sdk"] == "gradio"
    assert create["exist_ok"] is True
    assert upload["repo_id"] == "someone/digits-demo" and upload["repo_type"] == "space"
    assert upload["folder_path"] == str(out)

    # No token, or the Hub says no: one line, exit 2, and the folder is kept for another try.
    monkeypatch.setattr(RecordingHfApi, "fail", huggingface_hub.errors.LocalTokenNotFoundError("Token is required"))
    code, _, err = run(capsys, "space", "--checkpoint", demo_checkpoint, "--out", tmp_path / "again", "--push", "a/b")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "HF_TOKEN" in err
    assert (tmp_path / "again" / "model.safetensors").is_file()
    with pytest.raises(SystemExit) as exit_info:  # not USER/NAME: refused before anything is written
        export.main(["space", "--checkpoint", str(demo_checkpoint), "--out", str(tmp_path / "x"), "--push", "nouser"])
    assert exit_info.value.code == 2 and "USER/NAME" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_missing_export_packages_are_one_line(monkeypatch, tmp_path, capsys):
    for command, module in (("onnx", "onnx"), ("quantize", "onnxruntime"), ("space", "safetensors")):
        with monkeypatch.context() as m:
            m.setitem(sys.modules, module, None)  # what `import module` meets when it is not installed
            extra = ["--data-dir", tmp_path] if command == "quantize" else []
            code, out, err = run(capsys, command, "--checkpoint", tmp_path / "missing.pth", *extra)
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"error: export.py {command} needs the {module} package")
        assert "pip install -r requirements-app.txt" in err
