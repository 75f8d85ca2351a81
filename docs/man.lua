-- pandoc Lua filter: a manual page of docs/NAME.SECTION.md, written as Markdown to be read as
-- Markdown too, becomes a man page (make man):
--   * the first line, `# NAME(SECTION)`, becomes the title line (.TH NAME SECTION …), and every
--     other heading moves one level up (`## NAME` is .SH, `### list` is .SS);
--   * no hyphenation and no justification (.nh, .ad l): many words are commands, paths and
--     keys, to be typed as they are, and too long for justified lines;
--   * the NAME section's `name — description` becomes `name \- description`, which
--     whatis/apropos (lexgrog) read;
--   * tables get column widths that fit an 80-column terminal (pandoc gives every table 70n,
--     which with the gaps between columns and the section's indent is wider than that);
--   * a link to another file of docs/ (architecture.md) becomes its path once installed,
--     $PREFIX/share/doc/gpubox/FILE; a link to a web page keeps its address in parentheses.

local function stringify(x)
  return pandoc.utils.stringify(x)
end

local in_name = false

local function header(h)
  if h.level > 1 then
    h.level = h.level - 1
  end
  in_name = h.level == 1 and stringify(h) == "NAME"
  return h
end

-- Only the first paragraph of NAME: `gpuboxctl — list …` → `gpuboxctl - list …`.
local function para(p)
  if not in_name then
    return nil
  end
  in_name = false
  for i, inline in ipairs(p.content) do
    if inline.t == "Str" and (inline.text == "—" or inline.text == "–") then
      p.content[i] = pandoc.RawInline("man", "\\-")
      return p
    end
  end
  return p
end

local function link(l)
  local target = l.target
  if target:match("^[a-z]+:") or target:match("^#") then
    return nil
  end
  -- A file beside the page in docs/, installed in the documentation directory.
  local file = target:gsub("#.*$", "")
  local path = pandoc.Code("$PREFIX/share/doc/gpubox/" .. file)
  if stringify(l.content) == file then
    return path
  end
  return { pandoc.Span(l.content), pandoc.Str(" ("), path, pandoc.Str(")") }
end

-- man -l at 80 columns leaves 78n, less the 7n indent of a section's text, for the table; tbl
-- puts 3n between columns, and pandoc writes each width as a fraction of 70n.
local TABLE_WIDTH = 71

local function text_width(text)
  return utf8.len(text) or #text
end

-- Column widths: a column whose text fits in its fair share of the room gets what it needs;
-- the others share the rest by how much text they have, each at least its longest word. A .ne
-- of its height first keeps groff's one-long-page (cR) rendering from warning that a text
-- block does not fit on the page.
local function table_widths(t)
  local n = #t.colspecs
  local natural, longest_word, cells = {}, {}, {}
  for i = 1, n do
    natural[i], longest_word[i] = 1, 1
  end
  local function measure(rows)
    for _, row in ipairs(rows) do
      local texts = {}
      for i, cell in ipairs(row.cells) do
        local text = stringify(cell.contents)
        texts[i] = text
        natural[i] = math.max(natural[i], text_width(text))
        for word in text:gmatch("%S+") do
          longest_word[i] = math.max(longest_word[i], text_width(word))
        end
      end
      table.insert(cells, texts)
    end
  end
  measure(t.head.rows)
  for _, body in ipairs(t.bodies) do
    measure(body.body)
  end
  local room = TABLE_WIDTH - 3 * (n - 1)
  local widths, open = {}, {}
  for i = 1, n do
    open[i] = true
  end
  local settled = true
  while settled do
    settled = false
    local count, total = 0, 0
    for i = 1, n do
      if open[i] then
        count, total = count + 1, total + natural[i]
      end
    end
    for i = 1, n do
      if open[i] and natural[i] <= room / count then
        widths[i], open[i], settled = natural[i], false, true
        room = room - natural[i]
      end
    end
    if not settled then
      for i = 1, n do
        if open[i] then
          widths[i] = math.max(longest_word[i], math.floor(room * natural[i] / total))
        end
      end
    end
  end
  local lines = 2
  for _, texts in ipairs(cells) do
    local height = 1
    for i, text in ipairs(texts) do
      height = math.max(height, math.ceil(text_width(text) / widths[i]) + 1)
    end
    lines = lines + height
  end
  for i = 1, n do
    t.colspecs[i] = { t.colspecs[i][1], widths[i] / 70 }
  end
  return { pandoc.RawBlock("man", ".ne " .. lines .. "v"), t }
end

function Pandoc(doc)
  local first = doc.blocks[1]
  local name, section
  if first and first.t == "Header" and first.level == 1 then
    name, section = stringify(first):match("^(.-)%((%d)%)$")
  end
  if not name then
    error("the first line must be `# NAME(SECTION)`")
  end
  doc.meta.title = pandoc.MetaString(name:upper())
  doc.meta.section = pandoc.MetaString(section)
  -- No hyphenation (.nh): most of these pages' words are commands, keys and paths.
  doc.meta.hyphenate = false
  doc.blocks:remove(1)
  -- In document order, so that para() knows when it is in NAME.
  for i, block in ipairs(doc.blocks) do
    if block.t == "Header" then
      doc.blocks[i] = header(block)
    elseif block.t == "Para" then
      doc.blocks[i] = para(block) or block
    end
  end
  local body = pandoc.walk_block(pandoc.Div(doc.blocks), { Link = link, Table = table_widths })
  -- Left-adjusted: justified, lines with long paths and keys get wide gaps, and a narrow table
  -- column's line of one long word cannot be adjusted at all (a groff warning).
  body.content:insert(1, pandoc.RawBlock("man", ".ad l"))
  return pandoc.Pandoc(body.content, doc.meta)
end
