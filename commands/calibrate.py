"""`python cli.py calibrate`: from top-k traces, the calibration grid, its power-law fit and decoding configs.

- Grid: positions binned by top-1 probability into 10 right-inclusive bins (0, 0.1] ... (0.9, 1]; for bin b
  and rank r (1..K): acc = P(gold token is at rank r), mu_uncond = mean prob of rank r, mu_cond = mean prob of
  rank r over the positions whose gold token is at rank r.
- Power law: least squares of log10 acc on log10 mu_uncond over the cells where both are > 0: A, B of
  c = 10^A * p^B (log10, as the decoding rule `cal_acc` uses it).
- Calibrated-TopK: for each bin from (0.9, 1] down to (0, 0.1], the largest rank whose acc > threshold (at
  least 1; 1 for a bin with fewer than `min_samples` positions): the 10 ints of `dynamic_top_k`.
Outputs in `output_dir`: calibration.json, calibration_heatmap.png, and two configs to stack on an experiment
(`--config calibrated_topk.yaml` / `--config calibrated_eps.yaml`) that set generation.decoding directly. They are
written as one set (all or none); a fit with B <= 0 writes no calibrated_eps.yaml and removes an earlier run's.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

from commands.traces import open_text
from core.errors import UserInputError
from core.io import check_output_folder, figure_png, write_file_set
from evaluation.decoding import DecodingSpec

BINS = [f"({b / 10:.1f}, {(b + 1) / 10:.1f}]" for b in range(10)]
OUTPUTS = ("calibration.json", "calibration_heatmap.png", "calibrated_topk.yaml", "calibrated_eps.yaml")


def read_traces(path: Path, ranks: int) -> tuple[np.ndarray, np.ndarray]:
    """(probs [N, ranks] of the top `ranks` tokens, gold rank [N]: 1..ranks, 0 = not among them)."""
    if not path.is_file():
        raise UserInputError(f"{path}: file not found")
    probs, gold, number = [], [], 0
    try:
        with open_text(path, "r") as file:
            for number, line in enumerate(tqdm(file, desc="reading traces", unit=" positions"), start=1):
                if not line.strip():
                    continue
                try:
                    ids, values, gt = trace_fields(line)
                except ValueError as error:
                    raise UserInputError(f"{path}:{number}: {error}") from None
                if len(ids) != len(values) or len(ids) < ranks:
                    raise UserInputError(
                        f"{path}:{number}: {len(ids)} ids and {len(values)} probs, need {ranks} of each (ranks={ranks})"
                    )
                if not all(0 <= p <= 1 for p in values[:ranks]):
                    raise UserInputError(f"{path}:{number}: probabilities must be in [0, 1]")
                probs.append(values[:ranks])
                gold.append(ids.index(gt) + 1 if gt in ids[:ranks] else 0)
    except (EOFError, OSError, UnicodeDecodeError, zlib.error) as error:  # a truncated or corrupt (.gz) file
        raise UserInputError(
            f"{path}: unreadable after line {number} (truncated or corrupt? {type(error).__name__}: {error})"
        ) from None
    if not probs:
        raise UserInputError(f"{path}: no trace lines")
    return np.asarray(probs, dtype=np.float64), np.asarray(gold)


def trace_fields(line: str) -> tuple[list[int], list[float], int]:
    """(top_ids, top_probs as floats, gt) of one trace line; ValueError naming the field at fault."""
    shape = "not a trace line {gt, top_ids, top_probs}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{shape} ({error})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{shape} (a JSON {type(record).__name__})")
    if missing := [key for key in ("gt", "top_ids", "top_probs") if key not in record]:
        raise ValueError(f"{shape} (missing {', '.join(repr(key) for key in missing)})")
    ids, probs, gt = record["top_ids"], record["top_probs"], record["gt"]
    if not isinstance(ids, list) or not all(is_token_id(i) for i in ids):
        raise ValueError(f"field 'top_ids' must be a list of token ids, got {ids!r:.80}")
    if not is_token_id(gt):
        raise ValueError(f"field 'gt' must be a token id, got {gt!r:.80}")
    try:
        if not isinstance(probs, list):
            raise TypeError
        values = [float(p) for p in probs]  # numbers, or strings of them ("0.12345678", as traces writes them)
    except (TypeError, ValueError):
        raise ValueError(f"field 'top_probs' must be a list of probabilities, got {probs!r:.80}") from None
    return ids, values, gt


def is_token_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def calibration_grid(probs: np.ndarray, gold: np.ndarray) -> dict[str, np.ndarray]:
    """counts [10], acc / mu_uncond / mu_cond [10, K] (mu_cond NaN where the gold never sits at that rank)."""
    ranks = probs.shape[1]
    bins = np.clip(np.ceil(probs[:, 0] * 10 - 1e-9).astype(int) - 1, 0, 9)  # right-inclusive (0, 0.1] ...
    counts = np.bincount(bins, minlength=10)
    hits = np.zeros((10, ranks))
    sums = np.zeros((10, ranks))
    cond_sums = np.zeros((10, ranks))
    np.add.at(sums, bins, probs)
    at = gold > 0
    np.add.at(hits, (bins[at], gold[at] - 1), 1)
    np.add.at(cond_sums, (bins[at], gold[at] - 1), probs[at, gold[at] - 1])
    with np.errstate(invalid="ignore", divide="ignore"):
        per_bin = np.maximum(counts, 1)[:, None]
        return {
            "counts": counts,
            "acc": hits / per_bin,
            "mu_uncond": sums / per_bin,
            "mu_cond": np.where(hits > 0, cond_sums / np.maximum(hits, 1), np.nan),
        }


def power_law_fit(acc: np.ndarray, mu: np.ndarray) -> tuple[float, float, int]:
    """(A, B, points) of log10 acc = A + B log10 mu over the cells where both are > 0."""
    keep = (acc > 0) & (mu > 0)
    if keep.sum() < 2:
        raise UserInputError("calibrate: fewer than 2 grid cells with acc > 0 and mu > 0: too few traces to fit")
    slope, intercept = np.polyfit(np.log10(mu[keep]), np.log10(acc[keep]), 1)
    return float(intercept), float(slope), int(keep.sum())


def calibrated_top_k(acc: np.ndarray, counts: np.ndarray, threshold: float, min_samples: int) -> list[int]:
    """dynamic_top_k: per bin from (0.9, 1] down to (0, 0.1], the largest rank with acc > threshold (>= 1)."""
    result = []
    for b in range(9, -1, -1):
        above = np.nonzero(acc[b] > threshold)[0]
        result.append(1 if counts[b] < min_samples or not len(above) else int(above[-1]) + 1)
    return result


def decoding_config(decoding: dict, note: str) -> str:
    """A config to stack on an experiment config: it sets model.init_args.generation.decoding."""
    DecodingSpec(**decoding)  # the snippet is valid by construction
    body = yaml.safe_dump({"model": {"init_args": {"generation": {"decoding": decoding}}}}, default_flow_style=None)
    return f"# {note}\n# Stack it: python cli.py test --config configs/decoding_gsm8k.yaml --config THIS_FILE\n{body}"


def heatmap(acc: np.ndarray, counts: np.ndarray, title: str) -> bytes:
    """The grid as a PNG (bytes): accuracy per top-1 bin and rank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(max(6, acc.shape[1] * 0.45), 5))
    image = axis.imshow(acc[::-1], aspect="auto", cmap="viridis", vmin=0, vmax=max(float(acc.max()), 1e-9))
    axis.set_xticks(range(acc.shape[1]), [str(r + 1) for r in range(acc.shape[1])])
    axis.set_yticks(range(10), [f"{BINS[b]} n={counts[b]}" for b in range(9, -1, -1)])
    axis.set_xlabel("rank")
    axis.set_ylabel("top-1 probability bin")
    axis.set_title(title)
    figure.colorbar(image, label="P(gold token at this rank)")
    figure.tight_layout()
    return figure_png(figure)


def calibrate(
    traces: str,
    output_dir: str,
    ranks: int = 20,
    threshold: float = 0.05,
    min_samples: int = 10,
    temperature: float = 1.0,
) -> dict:
    """Calibration grid, heatmap, power-law fit and Calibrated-TopK / Calibrated-epsilon decoding configs.

    Args:
        traces: a top-k traces JSONL (.gz allowed) written by `cli.py traces`.
        output_dir: where calibration.json, calibration_heatmap.png and the two decoding configs go (as one set;
            with B <= 0 no calibrated_eps.yaml, and an earlier run's is removed).
        ranks: K, the ranks of the grid (at most the traces' k).
        threshold: Calibrated-TopK keeps ranks whose accuracy is > this; also the cal_acc threshold.
        min_samples: a bin with fewer positions gets k = 1.
        temperature: the sampling temperature the written decoding configs use (finite, > 0).
    """
    if not isinstance(ranks, int) or ranks < 1:
        raise UserInputError(f"calibrate: ranks must be an integer >= 1, got {ranks}")
    if not 0 < threshold < 1:
        raise UserInputError(f"calibrate: threshold must be in (0, 1), got {threshold}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise UserInputError(
            f"calibrate: temperature must be a finite number > 0 (the configs sample), got {temperature}"
        )
    check_output_folder(output_dir, "calibrate --output_dir")
    probs, gold = read_traces(Path(traces), ranks)
    grid = calibration_grid(probs, gold)
    a, b, points = power_law_fit(grid["acc"], grid["mu_uncond"])
    top_k = calibrated_top_k(grid["acc"], grid["counts"], threshold, min_samples)
    out = Path(output_dir)
    summary = {
        "traces": str(traces),
        "positions": int(len(gold)),
        "ranks": ranks,
        "bins": BINS,
        "counts": grid["counts"].tolist(),
        **{key: np.where(np.isnan(grid[key]), None, grid[key]).tolist() for key in ("acc", "mu_uncond", "mu_cond")},
        "fit": {"A": a, "B": b, "points": points, "formula": "log10 acc = A + B * log10 mu_uncond"},
        "threshold": threshold,
        "dynamic_top_k": top_k,
    }
    source = f"from {traces} (threshold {threshold})"
    outputs = {
        "calibration.json": json.dumps(summary, indent=2, ensure_ascii=False) + "\n",
        "calibration_heatmap.png": heatmap(grid["acc"], grid["counts"], f"{Path(traces).name}: P(gold at rank)"),
        "calibrated_topk.yaml": decoding_config(
            {"temperature": temperature, "dynamic_top_k": top_k}, f"Calibrated-TopK {source}"
        ),
    }
    if b > 0:
        outputs["calibrated_eps.yaml"] = decoding_config(
            {"temperature": temperature, "cal_acc": [round(a, 6), round(b, 6), threshold]},
            f"Calibrated-epsilon {source}",
        )
    # One set, all or none: a failure above wrote nothing; an earlier run's calibrated_eps.yaml that this fit
    # cannot replace is removed with the same write, so the folder never mixes two runs.
    removed = write_file_set(out, outputs, stale=OUTPUTS)
    if b <= 0:
        note = "; removed the earlier run's calibrated_eps.yaml" if removed else ""
        print(f"fit slope B = {b:.4f} <= 0: no calibrated_eps.yaml (cal_acc needs B > 0){note}")
    print(grid_table(grid, min(ranks, 10)))
    print(f"fit: log10 acc = {a:.4f} + {b:.4f} log10 p ({points} cells); dynamic_top_k = {top_k}")
    print(f"Calibration outputs: {out}/")
    return summary


def grid_table(grid: dict, columns: int) -> str:
    lines = [f"{'bin':<12}{'n':>9}" + "".join(f"{'acc@' + str(r + 1):>9}" for r in range(columns))]
    for b in range(9, -1, -1):
        lines.append(f"{BINS[b]:<12}{grid['counts'][b]:>9}" + "".join(f"{v:>9.4f}" for v in grid["acc"][b, :columns]))
    return "\n".join(lines)
