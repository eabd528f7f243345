// markdown.js — a small, safe Markdown renderer for model output.
//
// It builds DOM nodes with createElement and textContent only, never innerHTML, so nothing in
// the text is ever interpreted as HTML: `<script>` stays the eight characters it is. Links
// are made only for http, https and mailto URLs. What it knows: paragraphs (a line break is
// a line break), ATX headings, emphasis, strong, strikethrough, inline code, fenced code
// blocks, bullet and ordered lists (nested by indentation), blockquotes, thematic breaks,
// links and bare URLs.
//
// Text between blocks is kept as (invisible) text nodes, so a rendered answer's textContent
// is its source text wherever no Markdown syntax was used.
//
// A text is cut into blocks at blank lines outside code fences, and every block is rendered
// on its own. That is what makes streaming cheap: MarkdownView renders a finished block once
// and re-renders only the last, still open one as text arrives; the result is the same as
// rendering the whole text at once.

const FENCE = /^\s*(`{3,}|~{3,})(.*)$/;
const HEADING = /^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$/;
const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
const QUOTE = /^ {0,3}> ?/;
const ITEM = /^( {0,12})([-*+]|\d{1,9}[.)])([ \t]+|$)/;
const BLANK = /^[ \t]*$/;
const SAFE_SCHEMES = new Set(["http:", "https:", "mailto:"]);
const PUNCTUATION = /[!-/:-@[-`{-~]/;
const MAX_INLINE_SEARCH = 4000; // how far an emphasis or code span may reach for its closer
const PLAIN_UNSAFE = /[\n\r\\`*_~[\]<>:]/; // what may change how earlier text renders

/**
 * Render Markdown to a fragment of DOM nodes. Model text never becomes HTML.
 * @param {string} text
 * @returns {DocumentFragment}
 */
export function renderMarkdown(text) {
  const fragment = document.createDocumentFragment();
  for (const part of scan(text, 0)) fragment.append(renderPart(text, part));
  return fragment;
}

/**
 * A container whose Markdown grows as text streams in. `append` renders a block once it can
 * no longer change and re-renders only the open block at the end.
 */
export class MarkdownView {
  /** @param {Element} root the element to render into (its content is replaced) */
  constructor(root) {
    this.root = root;
    this.source = "";
    this.stable = 0; // source[0:stable] is rendered for good
    this.tail = []; // the nodes of source[stable:]
  }

  /**
   * Replace the whole text.
   * @param {string} text
   */
  set(text) {
    this.root.replaceChildren();
    this.source = "";
    this.stable = 0;
    this.tail = [];
    this.append(text);
  }

  /**
   * Add text at the end.
   * @param {string} more
   */
  append(more) {
    const text = extensibleText(this, more);
    if (text) {
      // Plain words added to the open paragraph: extend its last text node, so the
      // browser keeps its layout of everything before (the common case while streaming).
      text.appendData(more);
      this.source += more;
      return;
    }
    this.source += more;
    for (const node of this.tail) node.remove();
    const parts = scan(this.source, this.stable);
    // Blocks before the last gap that has text after it are final.
    let open = 0;
    for (let k = parts.length - 1; k > 0; k--) {
      if (parts[k].block && !parts[k - 1].block) {
        open = k;
        break;
      }
    }
    const frozen = document.createDocumentFragment();
    for (const part of parts.slice(0, open)) frozen.append(renderPart(this.source, part));
    this.root.append(frozen);
    if (open > 0) this.stable = parts[open].start;
    this.tail = parts.slice(open).map((part) => renderPart(this.source, part));
    this.root.append(...this.tail);
  }
}

/**
 * The text node that `more` can simply be added to, when that renders exactly what a full
 * render would: the open block ends in a paragraph whose last node is text, `more` has no
 * line break and nothing inline Markdown could act on, and the last line cannot turn into
 * another kind of block (it already has a character no block marker has).
 * @param {MarkdownView} view
 * @param {string} more
 * @returns {Text | null}
 */
function extensibleText(view, more) {
  if (!more || PLAIN_UNSAFE.test(more) || !view.tail.length) return null;
  const source = view.source;
  if (source.endsWith("\\") || source.slice(-2100).includes("://")) return null;
  const lastLine = source.slice(source.lastIndexOf("\n") + 1);
  if (!/[^#\-*+_>`~0-9.)\s]/.test(lastLine)) return null;
  let block = view.tail.at(-1);
  if (block.nodeType === Node.ELEMENT_NODE && block.classList.contains("md-group")) {
    block = block.lastChild;
  }
  if (!block || block.nodeName !== "P") return null;
  const text = block.lastChild;
  return text && text.nodeType === Node.TEXT_NODE ? text : null;
}

/**
 * Cut text[from:] into blocks (between blank lines) and gaps (the line ends and blank lines
 * between them). Blank lines inside a code fence belong to its block.
 * @param {string} text
 * @param {number} from
 * @returns {{block: boolean, start: number, end: number}[]}
 */
function scan(text, from) {
  const parts = [];
  let fence = null;
  let blockStart = -1;
  let lastEnd = from; // the end of the last block line (before its line break)
  let gapStart = from;
  let position = from;
  while (position <= text.length) {
    let end = text.indexOf("\n", position);
    if (end < 0) end = text.length;
    const line = text.slice(position, end);
    const blank = fence === null && BLANK.test(line);
    if (blank) {
      if (blockStart >= 0) {
        parts.push({ block: true, start: blockStart, end: lastEnd });
        blockStart = -1;
        gapStart = lastEnd;
      }
    } else {
      if (blockStart < 0) {
        if (position > gapStart) parts.push({ block: false, start: gapStart, end: position });
        blockStart = position;
      }
      lastEnd = end;
      fence = nextFence(fence, line);
    }
    if (end >= text.length) break;
    position = end + 1;
  }
  if (blockStart >= 0) parts.push({ block: true, start: blockStart, end: lastEnd });
  else if (text.length > gapStart) parts.push({ block: false, start: gapStart, end: text.length });
  return parts;
}

/** The fence open after `line` (null when none). */
function nextFence(fence, line) {
  const match = FENCE.exec(line);
  if (fence === null) {
    if (!match || (match[1][0] === "`" && match[2].includes("`"))) return null;
    return match[1];
  }
  if (match && match[1][0] === fence[0] && match[1].length >= fence.length && BLANK.test(match[2])) {
    return null;
  }
  return fence;
}

function renderPart(text, part) {
  const source = text.slice(part.start, part.end);
  if (!part.block) return document.createTextNode(source);
  const fragment = document.createDocumentFragment();
  renderBlocks(source.split("\n"), fragment);
  // MarkdownView removes and replaces a part's nodes together: one node per part.
  return fragment.childNodes.length === 1 ? fragment.firstChild : asGroup(fragment);
}

/**
 * Several blocks as one node (a `display: contents` wrapper in style.css).
 * @param {DocumentFragment} fragment
 */
function asGroup(fragment) {
  const group = document.createElement("div");
  group.className = "md-group";
  group.append(fragment);
  return group;
}

/**
 * Render lines (a block: no blank lines outside fences, or any text inside a container)
 * into parent.
 * @param {string[]} lines
 * @param {Node} parent
 */
function renderBlocks(lines, parent) {
  let i = 0;
  let first = true;
  const separate = (separator = "\n") => {
    if (!first) parent.append(document.createTextNode(separator));
    first = false;
  };
  while (i < lines.length) {
    const line = lines[i];
    if (BLANK.test(line)) {
      // Only inside containers (quotes, list items): keep the line end.
      parent.append(document.createTextNode("\n"));
      i++;
      continue;
    }
    const fence = FENCE.exec(line);
    if (fence && !(fence[1][0] === "`" && fence[2].includes("`"))) {
      separate();
      const indent = line.length - line.trimStart().length;
      const body = [];
      let j = i + 1;
      let open = true;
      while (j < lines.length) {
        const closing = FENCE.exec(lines[j]);
        if (
          closing &&
          closing[1][0] === fence[1][0] &&
          closing[1].length >= fence[1].length &&
          BLANK.test(closing[2])
        ) {
          open = false;
          break;
        }
        body.push(dedent(lines[j], indent));
        j++;
      }
      const pre = document.createElement("pre");
      const code = document.createElement("code");
      const language = fence[2].trim().split(/\s+/)[0];
      if (language) {
        pre.dataset.lang = language.slice(0, 32);
        code.className = `language-${language.replace(/[^\w+#.-]/g, "").slice(0, 32)}`;
      }
      if (open) pre.dataset.open = "true";
      code.textContent = body.join("\n");
      pre.append(code);
      parent.append(pre);
      i = open ? j : j + 1;
      continue;
    }
    const heading = HEADING.exec(line);
    if (heading) {
      separate();
      const element = document.createElement(`h${heading[1].length}`);
      inline(heading[2] ?? "", element);
      parent.append(element);
      i++;
      continue;
    }
    if (RULE.test(line)) {
      separate();
      parent.append(document.createElement("hr"));
      i++;
      continue;
    }
    if (QUOTE.test(line)) {
      separate();
      const inner = [];
      while (i < lines.length && QUOTE.test(lines[i])) {
        inner.push(lines[i].replace(QUOTE, ""));
        i++;
      }
      const quote = document.createElement("blockquote");
      renderBlocks(inner, quote);
      parent.append(quote);
      continue;
    }
    const item = ITEM.exec(line);
    if (item) {
      separate();
      i = renderList(lines, i, parent);
      continue;
    }
    // A paragraph: up to the next line that starts another block.
    separate();
    const start = i;
    i++;
    while (i < lines.length && !startsBlock(lines[i])) i++;
    const paragraph = document.createElement("p");
    inline(lines.slice(start, i).join("\n"), paragraph);
    parent.append(paragraph);
  }
}

function startsBlock(line) {
  if (BLANK.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line)) return true;
  const fence = FENCE.exec(line);
  if (fence && !(fence[1][0] === "`" && fence[2].includes("`"))) return true;
  return ITEM.test(line) && !BLANK.test(line.replace(ITEM, ""));
}

function dedent(line, count) {
  let k = 0;
  while (k < count && line[k] === " ") k++;
  return line.slice(k);
}

/**
 * Render the list starting at lines[i]; return the index after it.
 * @param {string[]} lines
 * @param {number} i
 * @param {Node} parent
 */
function renderList(lines, i, parent) {
  const first = ITEM.exec(lines[i]);
  const indent = first[1].length;
  const ordered = /\d/.test(first[2]);
  const kind = ordered ? first[2].slice(-1) : first[2];
  const list = document.createElement(ordered ? "ol" : "ul");
  if (ordered) {
    const start = Number.parseInt(first[2], 10);
    if (start !== 1) list.start = start;
  }
  let firstItem = true;
  while (i < lines.length) {
    const match = ITEM.exec(lines[i]);
    if (!match || match[1].length !== indent) break;
    const matchKind = /\d/.test(match[2]) ? match[2].slice(-1) : match[2];
    if (matchKind !== kind) break;
    const contentIndent = indent + match[2].length + Math.min(Math.max(match[3].length, 1), 4);
    const content = [lines[i].slice(match[0].length)];
    i++;
    while (i < lines.length) {
      const line = lines[i];
      const lead = line.length - line.trimStart().length;
      if (BLANK.test(line)) {
        // A blank line stays in the item only when the item goes on after it.
        const next = lines.slice(i + 1).find((l) => !BLANK.test(l));
        if (next === undefined || next.length - next.trimStart().length < contentIndent) break;
        content.push("");
      } else if (lead >= contentIndent) {
        content.push(dedent(line, contentIndent));
      } else if (ITEM.test(line) && ITEM.exec(line)[1].length > indent) {
        content.push(line.trimStart() === line ? line : dedent(line, lead)); // a nested list
      } else if (!startsBlock(line)) {
        content.push(line); // a lazy continuation
      } else {
        break;
      }
      i++;
    }
    if (!firstItem) list.append(document.createTextNode("\n"));
    firstItem = false;
    const element = document.createElement("li");
    const simple = content.length === 1 || content.slice(1).every((l) => !startsBlock(l));
    if (simple) inline(content.join("\n"), element);
    else renderBlocks(content, element);
    list.append(element);
  }
  parent.append(list);
  return i;
}

/**
 * Render inline Markdown (code, emphasis, strong, strikethrough, links, URLs) into parent.
 * Everything else is literal text.
 * @param {string} text
 * @param {Node} parent
 */
function inline(text, parent) {
  let plain = "";
  const flush = () => {
    if (plain) parent.append(document.createTextNode(plain));
    plain = "";
  };
  let i = 0;
  while (i < text.length) {
    const c = text[i];
    if (c === "\\" && i + 1 < text.length && PUNCTUATION.test(text[i + 1])) {
      plain += text[i + 1];
      i += 2;
      continue;
    }
    if (c === "`") {
      let n = 1;
      while (text[i + n] === "`") n++;
      const close = findRun(text, "`", n, i + n);
      if (close < 0) {
        plain += text.slice(i, i + n);
        i += n;
        continue;
      }
      flush();
      let body = text.slice(i + n, close);
      if (body.length > 2 && body[0] === " " && body.at(-1) === " " && body.trim()) {
        body = body.slice(1, -1);
      }
      const code = document.createElement("code");
      code.textContent = body;
      parent.append(code);
      i = close + n;
      continue;
    }
    if (c === "*" || c === "_" || c === "~") {
      let n = 1;
      while (text[i + n] === c) n++;
      const size = c === "~" ? (n === 2 ? 2 : 0) : Math.min(n, 2);
      const before = i > 0 ? text[i - 1] : " ";
      const after = text[i + n] ?? " ";
      const opens =
        size > 0 && !/\s/.test(after) && !(c === "_" && /[\p{L}\p{N}]/u.test(before));
      const close = opens ? findCloser(text, c, size, i + size) : -1;
      if (close < 0) {
        plain += text.slice(i, i + n);
        i += n;
        continue;
      }
      flush();
      const element = document.createElement(c === "~" ? "del" : size === 2 ? "strong" : "em");
      inline(text.slice(i + size, close), element);
      parent.append(element);
      i = close + size;
      continue;
    }
    if (c === "[") {
      const link = parseLink(text, i);
      if (link) {
        flush();
        const anchor = safeLink(link.url);
        if (anchor) {
          inlineWithoutLinks(link.label, anchor);
          parent.append(anchor);
        } else {
          parent.append(document.createTextNode(text.slice(i, link.end)));
        }
        i = link.end;
        continue;
      }
    }
    if (c === "<") {
      const end = text.indexOf(">", i);
      const inside = end > i ? text.slice(i + 1, end) : "";
      if (/^(https?:\/\/|mailto:)[^\s<>]+$/i.test(inside)) {
        const anchor = safeLink(inside);
        if (anchor) {
          flush();
          anchor.textContent = inside;
          parent.append(anchor);
          i = end + 1;
          continue;
        }
      }
    }
    if ((c === "h" || c === "H") && /[^\p{L}\p{N}]/u.test(i > 0 ? text[i - 1] : " ")) {
      const match = /^https?:\/\/[^\s<>"]+/i.exec(text.slice(i, i + 2048));
      if (match) {
        const url = match[0].replace(/[.,;:!?'")\]*_~]+$/, "");
        const anchor = url.length > 8 ? safeLink(url) : null;
        if (anchor) {
          flush();
          anchor.textContent = url;
          parent.append(anchor);
          i += url.length;
          continue;
        }
      }
    }
    plain += c;
    i++;
  }
  flush();
}

function inlineWithoutLinks(text, parent) {
  // Links cannot nest: render the label's own brackets as text.
  inline(text.replaceAll("[", "\\["), parent);
}

/** The index of the next run of exactly n `char`s at or after from (within reach), or -1. */
function findRun(text, char, n, from) {
  const limit = Math.min(text.length, from + MAX_INLINE_SEARCH);
  let k = text.indexOf(char, from);
  while (k >= 0 && k < limit) {
    let m = 1;
    while (text[k + m] === char) m++;
    if (m === n) return k;
    k = text.indexOf(char, k + m);
  }
  return -1;
}

/** Where an emphasis opened at from - size closes, or -1. */
function findCloser(text, char, size, from) {
  const limit = Math.min(text.length, from + MAX_INLINE_SEARCH);
  let k = text.indexOf(char, from + 1);
  while (k >= 0 && k < limit) {
    let m = 1;
    while (text[k + m] === char) m++;
    const before = text[k - 1];
    const after = text[k + m] ?? " ";
    const fits = size === 2 ? m >= 2 : m === 1 || m >= 3;
    const closes = !/\s/.test(before) && !(char === "_" && /[\p{L}\p{N}]/u.test(after));
    if (fits && closes) return size === 2 && m >= 3 ? k + m - 2 : k;
    k = text.indexOf(char, k + m);
  }
  return -1;
}

/** `[label](url "title")` at text[i], or null. */
function parseLink(text, i) {
  let depth = 0;
  let k = i;
  const limit = Math.min(text.length, i + 1000);
  for (; k < limit; k++) {
    if (text[k] === "\\") k++;
    else if (text[k] === "[") depth++;
    else if (text[k] === "]" && --depth === 0) break;
  }
  if (k >= limit || text[k + 1] !== "(") return null;
  const close = text.indexOf(")", k + 2);
  if (close < 0 || close - k > 2048) return null;
  const target = text.slice(k + 2, close).trim();
  const url = target.split(/\s+/)[0].replace(/^<(.*)>$/, "$1");
  if (!url) return null;
  return { label: text.slice(i + 1, k), url, end: close + 1 };
}

/** An `<a>` for url when its scheme is http, https or mailto; otherwise null. */
function safeLink(url) {
  let parsed;
  try {
    parsed = new URL(url);
  } catch {
    return null;
  }
  if (!SAFE_SCHEMES.has(parsed.protocol)) return null;
  const anchor = document.createElement("a");
  anchor.href = parsed.href;
  anchor.rel = "noopener noreferrer nofollow";
  anchor.target = "_blank";
  return anchor;
}
