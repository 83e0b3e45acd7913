"""Wire keys shared by the ServerApp, the ClientApp and the strategies.

Everything that crosses a Flower message (record names, config keys, metric
names, message types) and every parameter-name prefix that decides what is
aggregated is named here once, so that a renamed key cannot leave one side of
the protocol behind. Plain strings only: importable everywhere, Flower or not.
"""

# --- Record names inside a RecordDict ---------------------------------------
ARRAYS = "arrays"  # model weights (the strategies' default arrayrecord key)
CONFIG = "config"  # per-message ConfigRecord
METRICS = "metrics"  # per-reply MetricRecord
EXPERT_BANK = "expert-bank"  # ArrayRecord of every client's frozen expert
CORRELATION = "correlation"  # FedSC: ArrayRecord with a correlation matrix
CORRELATION_KEY = "r"  # ... a client's own (noised) R_i
R_EXT_KEY = "r-ext"  # ... the weighted mean of the other clients' matrices

# --- Message types (``@app.<category>("<name>")`` on the client) -----------
MSG_INFO = "query.info"  # node -> partition id, data sizes
MSG_FEDCE = "train.fedce"  # stage 1: end-to-end classifier, FedAvg
MSG_EXPERT = "train.expert"  # stage 2: personalized expert on cached latents
MSG_EXPERT_BANK = "query.expert_bank"  # stage 3 set-up: store the frozen bank
MSG_GATE = "train.gate"  # stage 3: gate training against the frozen bank
MSG_LOCAL_BASELINE = "train.local_classifier"  # baseline: local data only
MSG_EVAL_CLASSIFIER = "evaluate.classifier"  # FedCE classifier on the test set
MSG_EVAL_NMOE = "evaluate.nmoe"  # NMoE prediction on the test set
MSG_EVAL_PROBE = "evaluate.probe"  # stage-1 extractor quality (kNN on latents)
MSG_CORRELATION = "query.correlation"  # FedSC phase 1: noised R_i
MSG_FEDSC = "train.fedsc"  # FedSC phase 2: local spectral contrastive training
MSG_LATENTS = "query.latents"  # cache latents of a frozen extractor
MSG_MOE = "train.moe"  # alignment: gate + assigned experts of the global MoE
MSG_EVAL_MOE = "evaluate.moe"  # alignment: the global MoE on the test set

# --- Config keys sent by the server -----------------------------------------
SERVER_ROUND = "server-round"  # injected by Flower's FedAvg
SHARED_PREFIXES = "shared-prefixes"  # parameter-name prefixes that are averaged
NUM_ROUNDS = "num-rounds"  # rounds of the current stage (for LR schedules)
ROUND_OFFSET = "round-offset"  # rounds done before a resume: the stage's round = server-round + offset
ASSIGNED_EXPERTS = "assigned-experts"  # alignment: experts a client trains this round
ALPHA = "alpha"  # FedSC: weight of the local term in the loss
NOISE_MULTIPLIER = "noise-multiplier"  # FedSC: DP noise std / sensitivity

# --- Metric keys returned by clients ----------------------------------------
NUM_EXAMPLES = "num-examples"  # FedAvg's weighting key
PARTITION_ID = "partition-id"
NUM_TRAIN = "num-train"
NUM_TEST = "num-test"
IN_CHANNELS = "in-channels"
NUM_CLASSES = "num-classes"
NUM_EXPERTS = "num-experts"
TRAIN_LOSS = "train-loss"
TRAIN_ACC = "train-acc"
ACCURACY = "accuracy"
MACRO_F1 = "macro-f1"
ROUTED_TO_NEIGHBOUR = "routed-to-neighbour"  # share of samples sent away
BYTES_PER_SAMPLE = "bytes-per-sample"  # NMoE: latent bytes sent to neighbours per sample
MINORITY_TO_OWNER = "minority-to-owner"  # NMoE: share of minority-class samples routed to an owner of their class
DOMINANT_SENT_AWAY = "dominant-sent-away"  # NMoE: share of dominant-class samples routed to a neighbour
ORACLE_PREFIX = "oracle-"  # NMoE: "oracle-<routing>-accuracy", ... of an oracle routing over the bank
IID_PREFIX = "iid-"  # metrics on the IID test set (the paper's second test setting), e.g. "iid-macro-f1"
TRAIN_PREFIX = "train-"  # gate: routing diagnostics on the client's training samples ("train-minority-to-owner")
NOISE_STD = "noise-std"  # FedSC: per-entry std of the noise a client added
EXPERT_ROUTED = "expert-routed"  # alignment: samples routed to each assigned expert
EXPERT_IMPROVEMENT = "expert-improvement"  # alignment: relative loss improvement per assigned expert
ROUTING_SHARE = "routing-share"  # alignment: share of samples the full router sends to each expert
SECONDS = "seconds"  # wall time of the client's work for this message
CLASS_SUPPORT_PREFIX = "class-support-"  # stage 2: "class-support-<c>", training samples of class c (gate candidates)
EXPERT_METRIC_PREFIX = "expert-"  # stage 2: "expert-accuracy", ... of the expert on its own test set
BYTES = "bytes"  # alignment: bytes sent down and up in a round (aggregated metric)
SIM_SECONDS = "sim-seconds"  # alignment: simulated wall time of a round (aggregated metric)

# --- node_config keys (deployment: --node-config "partition-id=0 ...") ------
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"
NODE_DATA_DIR = "data-dir"  # optional: this node's data folder (overrides the run config)
NODE_OUTPUT_DIR = "output-dir"  # optional: this node's output/work folder

# --- Parameter-name prefixes: they decide what is aggregated ---------------
EXTRACTOR_PREFIX = "extractor."  # Classifier / SSLModel: the shared extractor F
HEAD_PREFIX = "head."  # Classifier: the FedCE head H
PROJECTOR_PREFIX = "projector."  # SSLModel: FedSC's projector
GATE_SHARED_PREFIX = "shared."  # Gate: shallow layers (FedGate averages these)
GATE_DECISION_PREFIX = "decision."  # Gate: decision layer (FedGate keeps it local)
MOE_GATE_PREFIX = "gate."  # GlobalMoE: the gate (averaged over all clients)
MOE_EXPERTS_PREFIX = "experts."  # GlobalMoE: "experts.<j>." is expert j
BANK_KEY_SEPARATOR = "/"  # expert-bank ArrayRecord keys: "<expert id>/<parameter>"
PACKED_MARK = "@"  # "<prefix>.@<kind>": a packed group of a state dict (records.pack)


def moe_expert_prefix(j: int) -> str:
    """Parameter-name prefix of expert ``j`` in the global MoE (``"experts.<j>."``)."""
    return f"{MOE_EXPERTS_PREFIX}{j}."
