"""The quantization layer: torch only (never lightning): prepare, convert, schedule, observer sync, the seams."""
