"""Small helpers shared across vlprompt."""
