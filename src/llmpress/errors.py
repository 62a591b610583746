"""Error types. A ``UserError`` is bad input: the CLI prints its one line and exits with 2."""


class LlmpressError(Exception):
    """Base class of llmpress errors."""


class UserError(LlmpressError, ValueError):
    """Bad input from the user (a path, a recipe field, a model, a text file)."""


class RecipeError(UserError):
    """A recipe that does not validate; the message names the field at fault."""


class UnsupportedArchitecture(UserError):
    """A model whose structure llmpress does not know."""
