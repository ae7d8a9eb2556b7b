"""The one exception a reader raises to refuse a file: its message says which limit the file passed."""


class Refused(Exception):
    """A file refused on purpose (too big, too many parts, entity declarations); not a parser failure."""
