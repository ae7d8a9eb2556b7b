"""Readers for documents that need a parser (PDF, HTML, .docx, .epub), each run in a child process held
to limits (child.py), because these are the formats a hostile upload can make expensive.

The parent side is sandbox.py. Every other module here runs only in the child, where this folder is on
sys.path and they import each other by their plain names: they import the standard library, their parsing
library and each other, never cag (whose __init__ pulls in torch), so a child starts in a fraction of a second.
"""
