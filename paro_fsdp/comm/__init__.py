"""PaRO-CC: collectives over a 2D (dp_replicate x dp_shard) mesh."""
