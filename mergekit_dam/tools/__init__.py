"""Tools around the merge: the offline merge lab, tiny model families, compare,
inspect and the demo."""
