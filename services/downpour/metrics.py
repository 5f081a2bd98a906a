"""Every Prometheus metric of downpour, defined in one place.

Names follow Prometheus conventions (base units, ``_total``, ``_seconds``,
``_bytes``). Services import the objects they update; ``downpour.rpc.server``
exposes them on ``/metrics``. Add new services' metrics here too, so that the
dashboards have one list to read.
"""

from __future__ import annotations

import threading

from prometheus_client import Counter, Gauge, Histogram

# -- every gRPC server (downpour.rpc.server's interceptor) ---------------------
GRPC_SERVER_STARTED = Counter(
    "grpc_server_started_total", "RPCs started on the server.", ["grpc_service", "grpc_method", "grpc_type"]
)
GRPC_SERVER_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, by status code.",
    ["grpc_service", "grpc_method", "grpc_type", "grpc_code"],
)
GRPC_SERVER_HANDLING_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time from the start of an RPC to its completion on the server.",
    ["grpc_service", "grpc_method", "grpc_type"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
SERVICE_READY = Gauge("downpour_service_ready", "1 once the service reports SERVING.", ["service"])

# -- parameter server -------------------------------------------------------------
PS_PULL_BYTES = Counter("downpour_paramserver_pull_bytes_total", "Parameter bytes sent by Pull.", ["shard"])
PS_PUSH_BYTES = Counter("downpour_paramserver_push_bytes_total", "Gradient bytes applied by Push.", ["shard"])
PS_PUSHES = Counter(
    "downpour_paramserver_pushes_total", "Pushes by outcome (applied, duplicate, rejected).", ["shard", "outcome"]
)
# One series per worker id, for the first MAX_WORKER_LABELS ids a process sees (a job's workers,
# restarts included); the ids are the client's choice, so any later one is counted as "other".
PS_WORKER_PUSHES = Counter(
    "downpour_paramserver_worker_pushes_total", "Pushes applied, per pushing worker.", ["shard", "worker"]
)
MAX_WORKER_LABELS = 256
_worker_labels: set[str] = set()
_worker_labels_lock = threading.Lock()


def worker_label(worker: str) -> str:
    """The ``worker`` label of PS_WORKER_PUSHES for this id: itself, or "other" past MAX_WORKER_LABELS ids."""
    with _worker_labels_lock:
        if worker in _worker_labels:
            return worker
        if len(_worker_labels) < MAX_WORKER_LABELS:
            _worker_labels.add(worker)
            return worker
    return "other"


PS_UPDATES = Counter("downpour_paramserver_block_updates_total", "Block updates applied.", ["shard"])
PS_STALENESS = Histogram(
    "downpour_paramserver_staleness_versions",
    "Version lag of a pushed gradient: block version at apply minus the version it was computed on.",
    ["shard"],
    buckets=(0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128),
)
PS_APPLY_SECONDS = Histogram(
    "downpour_paramserver_apply_seconds", "Time to apply one push's update under the block locks.", ["shard"]
)
PS_BLOCKS = Gauge("downpour_paramserver_blocks", "Blocks held by the shard.", ["shard"])
PS_PARAMETERS = Gauge("downpour_paramserver_parameters", "float32 parameters held by the shard.", ["shard"])
CHECKPOINT_SECONDS = Histogram(
    "downpour_checkpoint_duration_seconds",
    "Time to write a checkpoint.",
    ["component"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
CHECKPOINT_BYTES = Gauge("downpour_checkpoint_bytes", "Size of the last checkpoint written.", ["component"])
CHECKPOINT_FAILURES = Counter(
    "downpour_checkpoint_failures_total",
    "Checkpoints (or parts of one) that could not be written; reason disk_full is ENOSPC/EDQUOT.",
    ["component", "reason"],
)
STATE_SAVE_FAILURES = Counter(
    "downpour_coordinator_state_save_failures_total",
    "Times the coordinator could not write state.json (kept in memory and written again a second later).",
)

# -- training: coordinator and workers ------------------------------------------
TRAINING_LOSS = Gauge("downpour_training_loss", "Last training loss reported, per replica.", ["replica"])
# Per replica and stage, from the workers' reports (downpour.scalars; the coordinator sets them): the
# TICA terms (reconstruction, sparsity, their ratio sparsity/reconstruction) and the fractions of dead
# and always-on (dense) pooled units; the effective encoder rows' (W1) and decoder columns' (W2) norms.
OBJECTIVE_TERM = Gauge(
    "downpour_objective_term",
    "Objective terms per replica and stage: reconstruction, sparsity, ratio (sparsity/reconstruction), "
    "dead and dense (fractions of pooled units); the mean over the steps of the last report.",
    ["replica", "stage", "term"],
)
WEIGHT_NORM = Gauge(
    "downpour_weight_norm",
    "Norms of a stage's effective encoder rows (W1) and decoder columns (W2), per replica: mean, min, max; "
    "and the block's rms.",
    ["replica", "stage", "block", "stat"],
)
WORKER_STEPS = Counter("downpour_worker_steps_total", "Minibatch steps computed by this worker.")
WORKER_EXAMPLES = Counter("downpour_worker_examples_total", "Examples processed by this worker.")
WORKER_HEARTBEATS = Counter("downpour_worker_heartbeats_total", "Heartbeats answered by the coordinator.")
COORDINATOR_MEMBERS = Gauge("downpour_coordinator_members", "Workers known to the coordinator.")
COORDINATOR_HEARTBEATS = Counter("downpour_coordinator_heartbeats_total", "Heartbeats received.")

# -- data feeder ------------------------------------------------------------------
FEEDER_BATCHES = Counter("downpour_feeder_batches_total", "Minibatches sent by StreamBatches.", ["split"])
FEEDER_EXAMPLES = Counter("downpour_feeder_examples_total", "Examples sent by StreamBatches.", ["split"])
FEEDER_QUEUE_DEPTH = Gauge(
    "downpour_feeder_queue_depth", "Batches prepared and waiting to be sent, over all open streams."
)
FEEDER_STREAMS = Gauge("downpour_feeder_streams", "StreamBatches calls in progress.")
FEEDER_SKIPPED_FILES = Counter(
    "downpour_feeder_skipped_files_total", "Dataset files that could not be decoded (each counted once)."
)

# -- neurons service -----------------------------------------------------------------
NEURONS_PARAMETERS_VERSION = Gauge(
    "downpour_neurons_parameters_version", "Version of the parameters the neurons service answers with."
)
NEURONS_REFRESHES = Counter(
    "downpour_neurons_refreshes_total", "Parameter refreshes by the neurons service, by outcome.", ["outcome"]
)
NEURONS_IMAGES = Counter(
    "downpour_neurons_images_total", "Images run through the network by the neurons service.", ["method"]
)
NEURONS_CANCELLED = Counter(
    "downpour_neurons_cancelled_total",
    "Neurons queries stopped part-way because their caller was gone (deadline passed or cancelled).",
    ["method"],
)
NEURONS_QUERIES_RUNNING = Gauge(
    "downpour_neurons_queries_running", "Heavy neurons queries (stimulus, top inputs, activations) running now."
)
NEURONS_QUERIES_QUEUED = Gauge(
    "downpour_neurons_queries_queued", "Heavy neurons queries waiting for a slot (--max-queued-queries at most)."
)
NEURONS_QUERIES_REJECTED = Counter(
    "downpour_neurons_queries_rejected_total",
    "Heavy neurons queries refused at once (RESOURCE_EXHAUSTED): every slot taken and the queue full.",
    ["method"],
)
NEURONS_OVER_BUDGET = Counter(
    "downpour_neurons_over_budget_total",
    "Neurons queries refused before any work because their cost was over the budget (RESOURCE_EXHAUSTED).",
    ["method"],
)
NEURONS_PARAM_BYTES = Gauge(
    "downpour_neurons_param_bytes", "Parameter bytes the neurons service holds now (one stage while a query runs)."
)
NEURONS_PARAM_BYTES_PEAK = Gauge(
    "downpour_neurons_param_bytes_peak", "Most parameter bytes the neurons service has held at once."
)
WORKER_HALO_BYTES = Counter("downpour_worker_halo_bytes_total", "Halo tensor bytes sent to peer partitions.")

# -- security and fault handling ------------------------------------------------------
GRPC_UNAUTHENTICATED = Counter(
    "downpour_grpc_unauthenticated_total",
    "RPCs refused with UNAUTHENTICATED, by reason (missing_token, bad_token, client_certificate).",
    ["grpc_service", "grpc_method", "reason"],
)
GRPC_CONNECTION_CAPPED = Counter(
    "downpour_grpc_connection_capped_total",
    "RPCs refused with RESOURCE_EXHAUSTED because their connection already had "
    "--max-streams-per-connection calls in the service.",
    ["grpc_service", "grpc_method"],
)
GRPC_PERMISSION_DENIED = Counter(
    "downpour_grpc_permission_denied_total",
    "RPCs refused with PERMISSION_DENIED: a valid token of a role the rights table does not allow.",
    ["grpc_service", "grpc_method", "role"],
)
COORDINATOR_SHARD_RECOVERIES = Counter(
    "downpour_coordinator_shard_recoveries_total",
    "Parameter shards found empty (restarted) and refilled, by source (checkpoint, initial).",
    ["shard", "source"],
)
PARAM_CLIENT_RETRIES = Counter(
    "downpour_param_client_retries_total", "Pull/push attempts to a shard retried after a failure.", ["op", "code"]
)
