"""Source data sets, non-IID device partitions and domain shifts, shared by export (pre-training), hub
(evaluation) and the demo. Imports numpy and ``fedge.protocol`` only (scikit-learn lazily)."""
