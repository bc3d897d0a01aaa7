"""Web demo: upload an image, see the model's five most probable classes.

    python app.py --checkpoint runs/resnet50/checkpoint.pth [--port 7860] [--host 0.0.0.0]
    CHECKPOINT_PATH=runs/resnet50/checkpoint.pth python app.py

ImageNet checkpoints show the class names bundled with torchvision; other class sets show their folder names.
Without a usable checkpoint the page says why and predicts nothing: no model is built from random weights.

Hugging Face Space: `python export.py space --checkpoint CKPT --out DIR [--push USER/NAME]` writes this app,
the modules it imports and the weights (model.safetensors, which the app loads when no checkpoint is named)
into a folder that is a complete Space.
"""

import argparse
import errno
import os
import socket
import sys
from pathlib import Path

from PIL import Image

from dataset_paths import DEFAULT_OUTPUT_DIR
from inference import EXIT_BAD_INPUT, WEIGHTS_FILE, Classifier, InferenceError, load_classifier, load_image, require

# Before gradio is imported: no usage statistics and no version check are sent anywhere. gradio itself is
# imported where it is used, so that without it main() can say what to install instead of a traceback.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

TOP_K = 5
DEFAULT_CHECKPOINT = str(DEFAULT_OUTPUT_DIR / "checkpoint.pth")  # where a bare `python train.py` saves
MAX_UPLOAD = "50mb"
PREVIEW_SIZE = 192


def load_for_page(path: str) -> tuple[Classifier | None, str]:
    """The classifier and a one-line status for the page; (None, why) when there is no usable checkpoint."""
    try:
        clf = load_classifier(path)
    except InferenceError as err:
        return None, (f"**No model is loaded, so nothing can be predicted.** {err} Start the app with "
                      f"`--checkpoint PATH` or set `CHECKPOINT_PATH`.")
    return clf, (f"Model: {clf.arch} from `{clf.source.name}`, {len(clf.class_names)} classes, "
                 f"{clf.image_size} px input.")


def predict(clf: Classifier | None, no_model_message: str, path: str | None):
    """(label scores for gr.Label, status line, the crop the network saw) for one uploaded file."""
    if clf is None:
        return None, no_model_message, None
    if not path:
        return None, "Upload an image to classify it.", None
    try:
        image = load_image(path, clf.image_size)
    except InferenceError as err:
        return None, f"**Cannot classify this upload.** {err}", None
    top = clf.top_k(image[None], TOP_K)[0]
    preview = Image.fromarray(image)
    if preview.width < PREVIEW_SIZE:  # a 32 px crop would be a speck on the page; enlarge it, pixels kept sharp
        factor = -(-PREVIEW_SIZE // preview.width)
        preview = preview.resize((preview.width * factor, preview.height * factor), Image.Resampling.NEAREST)
    return dict(top), f"Top {len(top)} of {len(clf.class_names)} classes.", preview


def default_checkpoint() -> str:
    """$CHECKPOINT_PATH, else the weights export.py space puts beside this file, else a training run's output."""
    beside = Path(__file__).with_name(WEIGHTS_FILE)
    return os.environ.get("CHECKPOINT_PATH") or (str(beside) if beside.is_file() else DEFAULT_CHECKPOINT)


def check_port_free(host: str, port: int) -> None:
    """InferenceError if host:port cannot be listened on, found before the model loads and the page is built;
    gradio's own message for a taken port names its launch() parameter, not this script's flag."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind) as s:
            # As servers bind: SO_REUSEADDR, so a port a just-stopped server left in TIME_WAIT counts as free.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(address)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise InferenceError(f"Port {port} is in use (another app.py?); pick a free one with --port.") from err
        raise InferenceError(f"Cannot listen on {host}:{port} ({err.strerror or err}); check --host and "
                             f"--port.") from err


def build_page(clf: Classifier | None, status: str):
    import gradio as gr

    # Uploads are deleted after an hour: a public demo should not accumulate what people send it.
    with gr.Blocks(title="ResNet-50 classifier", analytics_enabled=False, delete_cache=(600, 3600)) as page:
        gr.Markdown("# ResNet-50 image classifier\nUpload an image to see the five most probable classes.")
        gr.Markdown(status, elem_id="model-status")
        with gr.Row():
            with gr.Column():
                # A file input rather than gr.Image: gr.Image decodes uploads itself, before any of our checks,
                # so a decompression bomb or a broken file would fail inside gradio instead of being answered.
                upload = gr.File(label="Image", file_count="single", type="filepath", elem_id="upload")
                crop = gr.Image(label="What the network sees (center crop)", interactive=False, height=224)
            with gr.Column():
                scores = gr.Label(num_top_classes=TOP_K, label="Predictions", elem_id="predictions")
                message = gr.Markdown("" if clf is None else "Upload an image to classify it.", elem_id="message")
        upload.change(lambda path: predict(clf, status, path), inputs=upload, outputs=[scores, message, crop])
    return page


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=default_checkpoint(),
                        help=f"train.py checkpoint or export.py .safetensors or .onnx (default: $CHECKPOINT_PATH, "
                             f"else {WEIGHTS_FILE} beside app.py, else {DEFAULT_CHECKPOINT})")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to listen on; 0.0.0.0 for other machines (default: %(default)s)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
                        help="port (default: %(default)s)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        require("gradio", what="app.py")
        check_port_free(args.host, args.port)
    except InferenceError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    import gradio as gr

    clf, status = load_for_page(args.checkpoint)
    print(status.replace("**", "").replace("`", ""), flush=True)
    # System fonts: the default theme would fetch Google Fonts, which a sandboxed Space or browser may block.
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    # run_history=False: uploads are not recorded for later viewing. max_file_size stops huge uploads before
    # they reach the disk; load_image refuses huge images (decompression bombs) before decoding them.
    build_page(clf, status).queue(default_concurrency_limit=2).launch(
        server_name=args.host, server_port=args.port, theme=theme, run_history=False, footer_links=[],
        max_file_size=MAX_UPLOAD)
    return 0


if __name__ == "__main__":
    sys.exit(main())
