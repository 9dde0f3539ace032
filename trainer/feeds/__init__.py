"""Where training batches come from: data sets, samplers, shards, generated images."""
