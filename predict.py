"""Top-5 classes for image files, from a train.py checkpoint or a model export.py wrote (.safetensors, .onnx).

    python predict.py photo.jpg more/*.png --checkpoint runs/resnet50/checkpoint.pth
    CHECKPOINT_PATH=runs/demo/checkpoint.pth python predict.py data/digits/val/digit_3/*.jpg --json

Images get the validation transform (resize to size / 0.875, center crop). A file that is not a usable image
is reported and the others are still classified; the exit status is then 2.
"""

import argparse
import json
import os
import sys
from pathlib import Path

from dataset_paths import DEFAULT_OUTPUT_DIR
from inference import EXIT_BAD_INPUT, InferenceError, load_classifier, load_image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", help="image files")
    default_checkpoint = os.environ.get("CHECKPOINT_PATH", str(DEFAULT_OUTPUT_DIR / "checkpoint.pth"))
    parser.add_argument("--checkpoint", default=default_checkpoint,
                        help="train.py checkpoint or export.py .safetensors or .onnx (default: $CHECKPOINT_PATH, "
                             "else %(default)s)")
    parser.add_argument("--top-k", type=int, default=5, help="how many classes to list per image")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image, one per line")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.top_k <= 0:
        parser.error("--top-k must be positive")
    try:
        clf = load_classifier(args.checkpoint)
    except InferenceError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    failed = 0
    for path in args.images:
        try:
            image = load_image(Path(path), clf.image_size)
        except InferenceError as err:
            failed += 1
            print(json.dumps({"image": path, "error": str(err)}) if args.json else f"error: {err}", file=sys.stderr)
            continue
        top = clf.top_k(image[None], args.top_k)[0]
        if args.json:
            print(json.dumps({"image": path, "predictions": [{"label": lbl, "probability": p} for lbl, p in top]}))
        else:
            print(path)
            print("\n".join(f"  {100 * p:6.2f}%  {label}" for label, p in top))
    return EXIT_BAD_INPUT if failed else 0


if __name__ == "__main__":
    sys.exit(main())
