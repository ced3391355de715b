"""A user's own project, trained with dtrain without touching dtrain: a sequence classifier."""
