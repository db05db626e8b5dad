"""Learned step types for planning tokens: step embeddings from a causal LM, then k-means or the SQ-VAE.

A step's embedding is the mean of the LM's last-layer hidden states over its tokens, the LM reading
"Question: q\\n " + the steps joined by " \\n" (so each step is conditioned on the question and every
earlier step). `StepTyper` is fitted once on the training steps, stored as tensors (k-means centres or
the VAE's weights) and reused for validation / test steps; `annotate_steps` caches the fitted typer and
the per-example types on disk, keyed by data, method and embedding model, so a second run reuses them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from core.io import atomic_path, write_json_atomic
from tasks.planning import PlanningSpec

log = logging.getLogger(__name__)
VAE_HIDDEN, VAE_CODE = 512, 64


@torch.no_grad()
def embed_steps(model, tokenizer, question: str, steps: list[str], max_length: int = 2048) -> torch.Tensor:
    """[len(steps), hidden] mean-pooled last-layer states of each step (pieces tokenised separately and
    concatenated as ids, so every span is exact); a step cut off by `max_length` gets the last state."""
    ids = tokenizer(f"Question: {question}\n ", add_special_tokens=False).input_ids
    spans = []
    for index, step in enumerate(steps):
        piece = tokenizer((" \n" if index else "") + step, add_special_tokens=False).input_ids
        spans.append((len(ids), len(ids) + len(piece)))
        ids += piece
    ids = ids[:max_length]
    hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0].float()
    rows = [hidden[start:end].mean(0) if start < min(end, len(ids)) else hidden[-1] for start, end in spans]
    return torch.stack(rows)


class StepVAE(nn.Module):
    """SQ-VAE: 3-layer MLP encoder -> Gaussian (mean, log-var) in R^K -> reparameterised sample -> softmax
    -> bias-free Linear(K -> 64) -> MLP decoder back to the embedding. Type = argmax of softmax(mean)."""

    def __init__(self, dim: int, num_types: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(dim, VAE_HIDDEN), nn.ReLU(), nn.Linear(VAE_HIDDEN, VAE_HIDDEN), nn.ReLU(),
            nn.Linear(VAE_HIDDEN, 2 * num_types),
        )  # fmt: skip
        self.codebook = nn.Linear(num_types, VAE_CODE, bias=False)
        self.decoder = nn.Sequential(
            nn.Linear(VAE_CODE, VAE_HIDDEN), nn.ReLU(), nn.Linear(VAE_HIDDEN, VAE_HIDDEN), nn.ReLU(),
            nn.Linear(VAE_HIDDEN, dim),
        )  # fmt: skip

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        mean, log_var = self.encoder(x).chunk(2, dim=-1)
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        code = self.codebook(torch.softmax(mean + torch.exp(0.5 * log_var) * noise, dim=-1))
        return self.decoder(code), code, mean, log_var


def vae_loss(vae: StepVAE, x, target, neighbour, contrastive: bool, generator) -> torch.Tensor:
    """0.5 * summed squared reconstruction error + 0.1 * KL to N(0, 1); the contrastive variant adds the
    cosine similarity of each step's code to its successor's (pushing adjacent codes apart)."""
    reconstruction, code, mean, log_var = vae(x, generator)
    kl = -0.5 * (1 + log_var - mean.pow(2) - log_var.exp()).sum()
    loss = 0.5 * (reconstruction - target).pow(2).sum() + 0.1 * kl
    if contrastive:
        _, next_code, _, _ = vae(neighbour, generator)
        loss = loss + torch.cosine_similarity(code, next_code, dim=-1).sum()
    return loss / len(x)


class StepTyper:
    """Fitted step-type assigner: k-means centres or an SQ-VAE, stored as plain tensors."""

    def __init__(self, spec: PlanningSpec, tensors: dict[str, torch.Tensor]) -> None:
        self.spec, self.tensors = spec, tensors

    @classmethod
    def fit(cls, spec: PlanningSpec, embeddings: torch.Tensor, successor: torch.Tensor, seed: int = 0) -> StepTyper:
        """Fit on the training steps; `successor[i]` is the row of step i's next step (itself for a last step).
        Seeded by `seed` alone; the global RNG is left as it was (training must not depend on the typer cache)."""
        if len(embeddings) < spec.num_types:
            raise ValueError(f"{len(embeddings)} training steps cannot form {spec.num_types} step types")
        if spec.method == "kmeans":
            from sklearn.cluster import KMeans

            kmeans = KMeans(n_clusters=spec.num_types, n_init=10, random_state=seed).fit(embeddings.double().numpy())
            return cls(spec, {"centres": torch.tensor(kmeans.cluster_centers_, dtype=torch.float32)})
        with torch.random.fork_rng(devices=[]):  # the VAE's initialisation draws from the global RNG
            torch.manual_seed(seed)
            vae = StepVAE(embeddings.shape[1], spec.num_types)
        optimizer = torch.optim.Adam(vae.parameters(), lr=1e-4)
        generator = torch.Generator().manual_seed(seed)
        target = embeddings[successor] if spec.method == "vae-next-step" else embeddings
        for _ in tqdm(range(spec.vae_epochs), desc="step VAE", leave=False):
            for batch in torch.randperm(len(embeddings), generator=generator).split(32):
                loss = vae_loss(
                    vae, embeddings[batch], target[batch], embeddings[successor[batch]],
                    spec.method == "vae-contrastive", generator,
                )  # fmt: skip
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return cls(spec, {f"vae.{k}": v.detach().clone() for k, v in vae.state_dict().items()})

    def predict(self, embeddings: torch.Tensor) -> list[int]:
        """The type (0..K-1) of each embedding row."""
        if "centres" in self.tensors:
            return torch.cdist(embeddings.double(), self.tensors["centres"].double()).argmin(1).tolist()
        with torch.device("meta"):  # no initialisation: it would draw from the global RNG
            vae = StepVAE(embeddings.shape[1], self.spec.num_types)
        vae.load_state_dict({k.removeprefix("vae."): v for k, v in self.tensors.items()}, assign=True)
        with torch.no_grad():
            mean, _ = vae.encoder(embeddings).chunk(2, dim=-1)
        return mean.argmax(-1).tolist()  # argmax of softmax(mean)


def _fingerprint(spec: PlanningSpec, train: list[tuple[str, list[str]]], seed: int) -> str:
    digest = hashlib.sha256(json.dumps([asdict(spec), seed, train], sort_keys=True).encode())
    return digest.hexdigest()[:16]


def annotate_steps(
    spec: PlanningSpec,
    train: list[tuple[str, list[str]]],
    splits: dict[str, list[tuple[str, str, list[str]]]],
    cache_folder: Path,
    load_embedder: Callable[[], tuple],
    seed: int = 0,
    typer: StepTyper | None = None,
) -> tuple[StepTyper, dict[str, dict[str, list[int]]]]:
    """(typer, split -> example id -> type of each step). `train` = (question, steps) the typer is fitted on
    (skipped when `typer` is given); `splits` = name -> [(id, question, steps)] to type; `load_embedder()`
    gives the (model, tokenizer) that embeds steps (called only when something must be embedded). The typer
    is cached under `cache_folder` keyed by training data, method and embedding model; each split's types
    keyed by the typer, the embedding model and the split's steps."""
    folder = cache_folder / _fingerprint(spec, train, seed)
    model = tokenizer = None
    memo: dict[str, torch.Tensor] = {}  # the training steps are embedded once, for fitting and for typing

    def embed(items) -> list[torch.Tensor]:
        nonlocal model, tokenizer
        rows = []
        for question, steps in tqdm(items, desc="embedding steps", leave=False):
            key = json.dumps([question, steps])
            if key not in memo:
                if model is None:
                    model, tokenizer = load_embedder()
                memo[key] = embed_steps(model, tokenizer, question, steps)
            rows.append(memo[key])
        return rows

    if typer is None and spec.cache and (folder / "typer.safetensors").is_file():
        typer = StepTyper(spec, load_file(folder / "typer.safetensors"))
    if typer is None:
        log.info("Fitting %s step types on %d training solutions (%s)", spec.method, len(train), spec.embedding_model)
        per_example = embed(train)
        successor, offset = [], 0
        for rows in per_example:
            successor += [offset + min(i + 1, len(rows) - 1) for i in range(len(rows))]
            offset += len(rows)
        typer = StepTyper.fit(spec, torch.cat(per_example), torch.tensor(successor), seed)
        if spec.cache:
            with atomic_path(folder / "typer.safetensors") as temporary:
                save_file(typer.tensors, str(temporary))
    typer_digest = hashlib.sha256()
    for key in sorted(typer.tensors):
        typer_digest.update(key.encode() + typer.tensors[key].numpy().tobytes())
    types = {}
    for name, items in splits.items():
        digest = hashlib.sha256(json.dumps([typer_digest.hexdigest(), spec.embedding_model, items]).encode())
        path = cache_folder / "types" / f"{name}_{digest.hexdigest()[:16]}.json"
        if spec.cache and path.is_file():
            types[name] = json.loads(path.read_text())
            continue
        embedded = embed([(question, steps) for _, question, steps in items])
        types[name] = {item[0]: typer.predict(rows) for item, rows in zip(items, embedded, strict=True)}
        if spec.cache:
            write_json_atomic(path, types[name])
    return typer, types
