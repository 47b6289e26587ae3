"""Where verdicts go: MQTT (with its on-disk spool), the JSONL audit file, the capture inbox, shadow reports."""
