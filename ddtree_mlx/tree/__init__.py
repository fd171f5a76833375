"""Draft trees: the tree and its walk (draft_tree), and growing one from a drafter's candidates (build)."""
