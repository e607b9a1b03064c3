// strdist.h: Levenshtein distance, for "did you mean" on unknown keys (names are short).
#pragma once

// Edit distance between a and b; 99 when either is longer than 63 characters.
int nm_edit_distance(const char *a, const char *b);
