"""Runtime support: distributed initialisation, the parallel context, CPU support for megatron-core."""
