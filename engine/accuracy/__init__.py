"""tt-metal's accuracy method: the evaluation text, the teacher-forced trial, per-token records and statistics."""
