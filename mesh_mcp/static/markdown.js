// A small, safe markdown renderer for model output (mesh-llm console; no dependencies).
//
// Safety: it never parses HTML. Every piece of model text reaches the page through `textContent` or
// `document.createTextNode`; the only attribute taken from the text is a link's href, and only when it is
// an absolute http(s) URL (anything else — javascript:, data:, relative — stays plain text). Links open
// with rel="noopener noreferrer" in a new tab.
//
// Supported: fenced code blocks (``` or ~~~, with a language), headings (#..######), bullet and numbered
// lists (one level), block quotes, horizontal rules, paragraphs; inline `code`, **bold**, *italic* / _italic_,
// ~~strike~~ and [text](https://…) links. An unclosed fence (while an answer streams) renders as code.

const FENCE = /^\s{0,3}(```|~~~)\s*([\w+#.-]*)\s*$/;
const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const BULLET = /^\s{0,3}[-*+]\s+(.*)$/;
const NUMBERED = /^\s{0,3}(\d{1,9})[.)]\s+(.*)$/;
const QUOTE = /^\s{0,3}>\s?(.*)$/;
const RULE = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;

/** Is `url` an absolute http(s) URL (the only links rendered as links)? */
export function safeHref(url) {
  try {
    const u = new URL(url);
    return u.protocol === "http:" || u.protocol === "https:" ? u.href : null;
  } catch {
    return null;
  }
}

function el(tag, cls) {
  const n = document.createElement(tag);
  if (cls) n.className = cls;
  return n;
}

// Inline spans, in the order they are looked for at each position.
const INLINE = [
  { re: /`([^`\n]+)`/y, make: (m) => withText(el("code"), m[1]) },
  { re: /\*\*(?=\S)([\s\S]*?\S)\*\*/y, make: (m) => inline(el("strong"), m[1]) },
  { re: /__(?=\S)([\s\S]*?\S)__/y, make: (m) => inline(el("strong"), m[1]) },
  { re: /~~(?=\S)([\s\S]*?\S)~~/y, make: (m) => inline(el("del"), m[1]) },
  { re: /\*(?=[^\s*])([^*\n]*?[^\s*])\*/y, make: (m) => inline(el("em"), m[1]) },
  { re: /\b_(?=[^\s_])([^_\n]*?[^\s_])_\b/y, make: (m) => inline(el("em"), m[1]) },
  {
    re: /\[([^\]\n]{1,500})\]\(\s*([^\s()]{1,2000})\s*\)/y,
    make: (m) => {
      const href = safeHref(m[2]);
      if (!href) return document.createTextNode(m[0]);
      const a = el("a");
      a.href = href;
      a.rel = "noopener noreferrer";
      a.target = "_blank";
      return inline(a, m[1]);
    },
  },
];

function withText(node, text) {
  node.textContent = text;
  return node;
}

/** Append the inline markdown of `text` to `parent` as DOM nodes; returns `parent`. */
export function inline(parent, text) {
  let plain = "";
  let i = 0;
  const flush = () => {
    if (plain) parent.appendChild(document.createTextNode(plain));
    plain = "";
  };
  while (i < text.length) {
    const c = text[i];
    let matched = false;
    if (c === "`" || c === "*" || c === "_" || c === "~" || c === "[") {
      for (const rule of INLINE) {
        rule.re.lastIndex = i;
        const m = rule.re.exec(text);
        if (m) {
          flush();
          parent.appendChild(rule.make(m));
          i += m[0].length;
          matched = true;
          break;
        }
      }
    }
    if (!matched) {
      plain += c;
      i += 1;
    }
  }
  flush();
  return parent;
}

/** Render `source` (markdown) into a DocumentFragment built only from elements and text nodes. */
export function renderMarkdown(source) {
  const out = document.createDocumentFragment();
  const lines = String(source ?? "").replace(/\r\n?/g, "\n").split("\n");
  let para = [];
  let list = null; // {node, ordered}
  let quote = [];

  const endPara = () => {
    if (para.length) out.appendChild(inline(el("p"), para.join("\n")));
    para = [];
  };
  const endList = () => {
    list = null;
  };
  const endQuote = () => {
    if (quote.length) {
      const q = el("blockquote");
      q.appendChild(renderMarkdown(quote.join("\n")));
      out.appendChild(q);
    }
    quote = [];
  };
  const endAll = () => {
    endPara();
    endList();
    endQuote();
  };

  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const fence = FENCE.exec(line);
    if (fence) {
      endAll();
      const body = [];
      let j = i + 1;
      while (j < lines.length && !(lines[j].trim().startsWith(fence[1]) && lines[j].trim() === fence[1])) {
        body.push(lines[j]);
        j++;
      }
      const pre = el("pre");
      const code = el("code");
      if (fence[2]) {
        code.className = "language-" + fence[2].replace(/[^\w+#.-]/g, "");
        pre.dataset.lang = fence[2];
      }
      code.textContent = body.join("\n");
      pre.appendChild(code);
      out.appendChild(pre);
      i = j; // the closing fence (or past the end while streaming)
      continue;
    }
    if (!line.trim()) {
      endAll();
      continue;
    }
    const q = QUOTE.exec(line);
    if (q) {
      endPara();
      endList();
      quote.push(q[1]);
      continue;
    }
    endQuote();
    if (RULE.test(line)) {
      endAll();
      out.appendChild(el("hr"));
      continue;
    }
    const h = HEADING.exec(line);
    if (h) {
      endAll();
      out.appendChild(inline(el("h" + Math.min(6, h[1].length + 2)), h[2]));
      continue;
    }
    const b = BULLET.exec(line);
    const n = b ? null : NUMBERED.exec(line);
    if (b || n) {
      endPara();
      const ordered = Boolean(n);
      if (!list || list.ordered !== ordered) {
        list = { node: el(ordered ? "ol" : "ul"), ordered };
        if (n && n[1] !== "1") list.node.start = Number(n[1]);
        out.appendChild(list.node);
      }
      list.node.appendChild(inline(el("li"), b ? b[1] : n[2]));
      continue;
    }
    if (list && /^\s{2,}\S/.test(line)) {
      // a continuation line of the last list item
      const last = list.node.lastChild;
      last.appendChild(document.createTextNode(" "));
      inline(last, line.trim());
      continue;
    }
    endList();
    para.push(line);
  }
  endAll();
  return out;
}
