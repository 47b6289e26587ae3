"""The daemon (`visiond run`), in flow order: sources -> queues -> worker (batch, classify,
decide) -> sinks (MQTT with its spool, JSONL, capture inbox, shadow), with metrics,
liveness and sd_notify beside them; `daemon.py` owns the lifecycle."""
