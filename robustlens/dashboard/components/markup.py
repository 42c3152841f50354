"""User strings as text: the one escape helper set every page uses for markdown, code spans and plotly/HTML.

Streamlit renders markdown in most places a string can go, so a class name, tag, file name or URL parameter
placed there as is could draw an outside image or a fake link. :func:`text` (markdown), :func:`code`
(inline code) and :func:`plot_text` (plotly, HTML) make any value show exactly as typed.
"""

from __future__ import annotations

import html
import re

# Streamlit renders markdown (GitHub-flavoured, plus its own ``:color[…]``, ``:material/…:`` and ``$…$``
# directives) in st.markdown, st.caption, st.title/subheader, alerts, widget labels, radio options, image
# captions, metric values and tooltips. A class name, tag, file name or URL parameter written there as is
# could draw an outside image or a fake link. Every user-controlled string goes through one of these.
_LINE_BREAKS = re.compile(r"[\r\n\u2028\u2029\x0b\x0c\x85]+")
_MARKUP = re.compile(
    r"[\\`*~\[\]<>|$]"  # code, emphasis, strikethrough, links/images, HTML, tables, maths
    r"|(?<![0-9A-Za-z])_|_(?![0-9A-Za-z])"  # emphasis: '_' at a word edge ('tshirt_top' stays as it is)
    r"|:(?=\S)"  # :material/icon:, :emoji:, :color[…], <scheme:…>
    r"|@"  # e-mail autolinks
    r"|&(?=#?[0-9A-Za-z]+;)"  # entity references (&lt; is shown as typed, not as '<')
)
_LINE_START = re.compile(r"^(?:[#>+\-=]|\d+(?=[.)]))")  # headings, quotes, lists, rules: only at the start
# GitHub's autolink literals (http://…, www.…, name@host) are found in the text *after* escapes are
# resolved, so a backslash does not stop them: an invisible word joiner inside the trigger does.
_AUTOLINK_TRIGGER = re.compile(r"(?i:https?)(?=://)|(?<![0-9A-Za-z])(?i:www)(?=\.)|@")
WORD_JOINER = "\u2060"


def text(value: object) -> str:
    """``value`` as markdown that renders exactly as its characters: nothing in it becomes markup.

    A backslash goes before every character that could start markup where it stands (CommonMark shows an
    escaped punctuation character literally): code spans, emphasis, strikethrough, brackets (so no link
    or image), ``<`` and ``>`` (no raw HTML, no ``<autolink>``), tables, ``$`` maths, ``:`` before a
    non-space (no Streamlit ``:material/…:`` or ``:red[…]`` directives), entity references, and a block
    marker (``#``, ``>``, ``-``, ``1.`` …) at the start. GitHub's autolink literals ignore escapes, so an
    invisible word joiner (U+2060) goes into ``http://``, ``https://``, ``www.`` and after ``@``: the text
    looks the same but makes no link. Line breaks become spaces and leading blanks go, so a user string
    never opens a block of its own. Ordinary names keep their look in the source (``tshirt_top``, ``needs-relabel``,
    ``images/a.png``, ``sample(s)``). Use it for every user string placed in markdown: text, captions,
    alerts, titles, widget labels, radio options, image captions, metric values, tooltips.
    """
    body = _LINE_BREAKS.sub(" ", str(value)).lstrip()
    body = _AUTOLINK_TRIGGER.sub(lambda m: m.group(0) + WORD_JOINER, body)
    body = _MARKUP.sub(lambda m: "\\" + m.group(0), body)
    return _LINE_START.sub(lambda m: m.group(0) + "\\" if m.group(0).isdigit() else "\\" + m.group(0), body)


def code(value: object) -> str:
    """``value`` as an inline code span (monospace, shown literally): a backtick fence longer than any run of
    backticks inside it, padded with spaces, so nothing in ``value`` can close it. Line breaks become spaces."""
    body = _LINE_BREAKS.sub(" ", str(value))
    longest = max((len(run) for run in re.findall(r"`+", body)), default=0)
    fence = "`" * (longest + 1)
    return f"{fence} {body} {fence}"


def plot_text(value: object) -> str:
    """``value`` for plotly (tick labels, legend entries, hover text, titles) and for HTML text: the characters
    plotly reads as markup (``<a href>``, ``<b>``, ``<br>`` …, ``&`` entities) are HTML-escaped, so it shows
    them as typed. Quotes are kept (they mean nothing outside a tag, and plotly would show ``&quot;``)."""
    return html.escape(str(value), quote=False)
