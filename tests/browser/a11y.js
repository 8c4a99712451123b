// Accessibility basics of the current page (used by test_dashboard.py through page.evaluate).
() => {
  const problems = [];
  if (document.documentElement.lang !== "en") problems.push("html lang is not 'en'");
  for (const el of document.querySelectorAll("input, select, textarea")) {
    if (el.type === "hidden") continue;
    const labelled = (el.id && document.querySelector(`label[for="${CSS.escape(el.id)}"]`))
      || el.closest("label") || el.getAttribute("aria-label") || el.getAttribute("aria-labelledby");
    if (!labelled) problems.push(`unlabelled ${el.tagName.toLowerCase()} name=${el.name}`);
  }
  for (const t of document.querySelectorAll("table")) {
    if (!t.querySelector("th")) problems.push("table without header cells");
    if (!t.querySelector("caption")) problems.push("table without caption");
  }
  for (const th of document.querySelectorAll("thead th")) {
    if (th.getAttribute("scope") !== "col") problems.push("column header without scope=col");
  }
  if (!document.querySelector("main")) problems.push("no main landmark");
  if (!document.querySelector("h1")) problems.push("no h1");
  // contrast of text against its effective background (WCAG 2 formula)
  const parse = (c) => { const m = c.match(/rgba?\(([^)]+)\)/); if (!m) return null;
    const p = m[1].split(",").map(Number); return {r: p[0], g: p[1], b: p[2], a: p.length > 3 ? p[3] : 1}; };
  const lum = ({r, g, b}) => { const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b); };
  const bgOf = (el) => { for (let e = el; e; e = e.parentElement) { const c = parse(getComputedStyle(e).backgroundColor);
    if (c && c.a > 0.5) return c; } return {r: 255, g: 255, b: 255, a: 1}; };
  const ratios = [];
  const sel = "body, main p, th, td, a, label, button, .muted, .status, .badge, .tag, .path, .cell, .alert, .notice, "
    + "header .brand, header nav a, caption, summary, code, .state, .help";
  const seen = new Set();
  for (const el of document.querySelectorAll(sel)) {
    if (!el.textContent.trim() || el.closest(".sr-only") || el.getClientRects().length === 0) continue;
    const fg = parse(getComputedStyle(el).color); if (!fg) continue;
    const bg = bgOf(el);
    const [l1, l2] = [lum(fg), lum(bg)].sort((x, y) => y - x);
    const ratio = (l1 + 0.05) / (l2 + 0.05);
    const key = getComputedStyle(el).color + "/" + JSON.stringify(bg);
    if (seen.has(key)) continue; seen.add(key);
    ratios.push(ratio);
    if (ratio < 4.5) problems.push(`contrast ${ratio.toFixed(2)} < 4.5 for ${el.tagName.toLowerCase()}.${el.className} "${el.textContent.trim().slice(0, 30)}"`);
  }
  return {problems, checked: ratios.length, min: Math.min(...ratios)};
}
