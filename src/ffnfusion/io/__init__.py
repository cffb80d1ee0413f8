"""Model and file I/O shared by every stage: where outputs may go, how they are written."""
