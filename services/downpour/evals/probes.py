"""``downpour eval supervised``'s per-stage linear probes: does unsupervised pretraining help each stage?

For every stage, a linear classifier (``linear.linear_accuracy``: the eval's labeled sets, the L2
penalty chosen on their validation fifth) reads the stage's L2-pooled output before its contrast
normalisation (its output if it has no pool: ``linear.stage_layers``), once from the pretrained
network and once from the same network at the weights its pretraining started from:
``Network(base).init_params(seed)``, the values every parameter shard of the pretraining job
draws from the job's seed (``downpour.nn.init``). One more row reads the random network's
all-stage readout (``--readout``), the counterpart of "linear classifier on deep features
(pretrained, frozen)". Every pretrained row is compared with its random one by the eval's spread
rule. A network's readout and stage features come from one forward pass per image set, once per
seed.
"""

from __future__ import annotations

import numpy as np

from downpour.evals import common as C
from downpour.evals import report
from downpour.evals.linear import feature_layers, from_activations, stage_layers
from downpour.nn import Network

RANDOM_FEATURES = "linear classifier on deep features, random weights (frozen)"


def pretrained_row(layer: str) -> str:
    return f"linear classifier on {layer} (pretrained, frozen)"


def random_row(layer: str) -> str:
    return f"linear classifier on {layer} (random weights, frozen)"


def probe_rows(net: Network) -> tuple[str, ...]:
    """The rows after the eval's own: the random network's readout, then every stage pretrained and random."""
    return (RANDOM_FEATURES, *(r for k in stage_layers(net) for r in (pretrained_row(k), random_row(k))))


def probe_comparisons(net: Network, features_row: str) -> tuple[tuple[str, str, str], ...]:
    """(pretrained row, random row, what): the readout's, then every stage's."""
    return (
        (features_row, RANDOM_FEATURES, "features: pretrained vs random"),
        *((pretrained_row(k), random_row(k), f"{k}: pretrained vs random") for k in stage_layers(net)),
    )


def network_features(
    net: Network, params: dict, x: np.ndarray, readout: str = "pooled"
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One forward pass: the readout's features (as ``linear.features``) and every stage layer's
    (float32, flattened: convert the rows a classifier uses)."""
    layers = list(dict.fromkeys(feature_layers(net, readout) + stage_layers(net)))
    acts = C.activations(net, params, x, layers=layers)
    return from_activations(net, acts, readout), {k: acts[k] for k in stage_layers(net)}


def feature_sets(
    net: Network,
    pretrained: dict,
    random: dict,
    x_labeled: np.ndarray,
    x_test: np.ndarray,
    readout: str,
    features_row: str,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Row name -> (labeled features, test features) for ``features_row`` (the pretrained readout)
    and every probe row (``probe_rows``' names)."""
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for params, readout_row, row in ((pretrained, features_row, pretrained_row), (random, RANDOM_FEATURES, random_row)):
        fl, sl = network_features(net, params, x_labeled, readout)
        ft, st = network_features(net, params, x_test, readout)
        out[readout_row] = (fl, ft)
        out.update({row(k): (sl[k], st[k]) for k in stage_layers(net)})
    return out


def chart(path: str, results: dict, features_row: str, caption: str) -> None:
    """Pretrained against random weights, the all-stage readout and every stage (``results``'
    ``probe_layers``): one panel per labeled-set size, the mean over seeds with the spread as error bars."""
    plt = report._plt()
    cells = {(r["row"], r["labels"]): (100 * r["mean"], 100 * r["spread"]) for r in results["rows"]}
    pairs = [(f"{results['settings']['readout']} readout", features_row, RANDOM_FEATURES)]
    pairs += [(k, pretrained_row(k), random_row(k)) for k in results["probe_layers"]]
    labels = results["labels"]
    fig, axes = plt.subplots(1, len(labels), figsize=(1.5 + 1.3 * len(pairs) * len(labels), 3.6), squeeze=False)
    x = np.arange(len(pairs))
    lo = min(cells[p[1 + i], n][0] - cells[p[1 + i], n][1] for p in pairs for i in (0, 1) for n in labels)
    for ax, n in zip(axes[0], labels):
        for i, what in enumerate(("pretrained", "random weights")):
            m, s = zip(*(cells[p[1 + i], n] for p in pairs))
            ax.bar(x + (i - 0.5) * 0.38, m, 0.38, yerr=s, capsize=3, label=what)
        ax.set_xticks(x, [p[0] for p in pairs], fontsize=7)
        ax.set_title(f"{n} labels", fontsize=8)
        ax.set_ylabel("linear classifier, test accuracy (%)", fontsize=7)
        ax.set_ylim(bottom=max(0.0, 10 * np.floor(lo / 10) - 10))
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(caption, fontsize=7, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
