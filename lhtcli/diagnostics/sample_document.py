"""A built-in sample document: a few sections of English prose (about 400-500 tokens).

Used by ``lht demo`` and by ``lht visualize`` / ``lht entropy`` when no ``--document`` is given, so
that every diagnostic works with no input at all. The format is the nested one of DESIGN.md
section 2: a list of sections, each a list of sentences.
"""

from __future__ import annotations

SAMPLE_TITLE = "How long documents are organised"

_SECTIONS: tuple[tuple[str, ...], ...] = (
    (
        "Long documents are rarely a flat stream of words.",
        "A report, a novel or a scientific paper is divided into sections, and every section is made "
        "of sentences that develop a single idea.",
        "Readers rely on this structure without noticing it.",
        "They skim the headings to find the part they need, then read the sentences inside it closely.",
        "A model that reads the whole text one token at a time throws this map away.",
    ),
    (
        "Attention lets every word look at every other word, but the cost grows with the square of the "
        "length.",
        "For a book chapter of eight thousand tokens that means tens of millions of pairs in every layer.",
        "Most of those pairs carry little information, because words mostly depend on their neighbours.",
        "A sliding window keeps only the nearby pairs and makes the cost grow linearly instead.",
        "The price is that a word near the end can no longer see a definition near the beginning.",
    ),
    (
        "Hierarchical attention adds a few long-range links that follow the shape of the text.",
        "The first word of each sentence can see the first words of nearby sentences.",
        "The first word of each section can see the openings of nearby sections.",
        "A single document token at the front is linked to every section, so a summary of the whole "
        "text can travel anywhere in two steps.",
        "Information flows from a word to its sentence, from the sentence to its section and back again.",
    ),
    (
        "These links are cheap, because sentences and sections are few compared with words.",
        "In a typical document only one token in twenty starts a sentence, and far fewer start a section.",
        "The model still computes exact attention over every pair that the rules allow.",
        "When training goes well, some heads stay local while others learn to use the distant links.",
        "Heatmaps and entropy statistics make that division of labour visible, layer by layer.",
    ),
)


def sample_document() -> list[list[str]]:
    """A fresh copy of the sample document (sections of sentences)."""
    return [list(section) for section in _SECTIONS]


def sample_text() -> str:
    """The sample as plain text: one paragraph per section."""
    return "\n\n".join(" ".join(section) for section in _SECTIONS)


__all__ = ["SAMPLE_TITLE", "sample_document", "sample_text"]
