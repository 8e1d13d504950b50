"""threadweaver-verl: ThreadWeaver's adaptive parallel reasoning as a verl plugin."""

__version__ = "0.1.0"
