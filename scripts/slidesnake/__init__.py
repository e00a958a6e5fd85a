"""slidesnake: whole-slide images to MIL predictions and attention heatmaps."""

__version__ = "0.1.0"
