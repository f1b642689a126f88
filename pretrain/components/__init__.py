"""Training components the trainer assembles: loss, optimizer and lr schedule, float8 conversion, metrics and
the peak FLOP/s they divide by, profiling, and the MoE expert-load bookkeeping."""
