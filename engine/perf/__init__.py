"""The analytic performance model: per-op bytes and FLOPs, collectives, calibration on the seed's published rows."""
