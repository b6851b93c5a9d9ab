package fakepg

import (
	"context"
	"fmt"
	"math"
	"sort"
	"strconv"
	"strings"
	"time"
)

// token is one lexical token; keywords and unquoted identifiers are lowercased.
type token struct {
	kind byte // 'w' word, 'q' quoted identifier, 's' string, 'n' number, 'p' $N, 'o' punctuation
	text string
}

// splitStatements tokenizes sql and splits it at semicolons, dropping empty
// statements.
func splitStatements(sql string) ([][]token, error) {
	var stmts [][]token
	var cur []token
	i := 0
	for i < len(sql) {
		c := sql[i]
		switch {
		case c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f':
			i++
		case c == '-' && i+1 < len(sql) && sql[i+1] == '-':
			for i < len(sql) && sql[i] != '\n' {
				i++
			}
		case c == '/' && i+1 < len(sql) && sql[i+1] == '*':
			end := strings.Index(sql[i+2:], "*/")
			if end < 0 {
				return nil, errorf("42601", "unterminated /* comment")
			}
			i += end + 4
		case c == '\'' || c == '"':
			var b strings.Builder
			j := i + 1
			for {
				if j >= len(sql) {
					return nil, errorf("42601", "unterminated quoted string or identifier")
				}
				if sql[j] == c {
					if j+1 < len(sql) && sql[j+1] == c {
						b.WriteByte(c)
						j += 2
						continue
					}
					break
				}
				b.WriteByte(sql[j])
				j++
			}
			kind := byte('s')
			if c == '"' {
				kind = 'q'
			}
			cur = append(cur, token{kind, b.String()})
			i = j + 1
		case c == '$' && i+1 < len(sql) && isDigit(sql[i+1]):
			j := i + 1
			for j < len(sql) && isDigit(sql[j]) {
				j++
			}
			cur = append(cur, token{'p', sql[i+1 : j]})
			i = j
		case isDigit(c) || (c == '.' && i+1 < len(sql) && isDigit(sql[i+1])):
			j := i
			for j < len(sql) && (isDigit(sql[j]) || sql[j] == '.' || sql[j] == 'e' || sql[j] == 'E' ||
				((sql[j] == '-' || sql[j] == '+') && (sql[j-1] == 'e' || sql[j-1] == 'E'))) {
				j++
			}
			cur = append(cur, token{'n', sql[i:j]})
			i = j
		case isWordStart(c):
			j := i
			for j < len(sql) && (isWordStart(sql[j]) || isDigit(sql[j]) || sql[j] == '$') {
				j++
			}
			cur = append(cur, token{'w', strings.ToLower(sql[i:j])})
			i = j
		case c == ':' && i+1 < len(sql) && sql[i+1] == ':':
			cur = append(cur, token{'o', "::"})
			i += 2
		case c == ';':
			if len(cur) > 0 {
				stmts = append(stmts, cur)
			}
			cur = nil
			i++
		default:
			cur = append(cur, token{'o', string(c)})
			i++
		}
	}
	if len(cur) > 0 {
		stmts = append(stmts, cur)
	}
	return stmts, nil
}

func isDigit(c byte) bool     { return c >= '0' && c <= '9' }
func isWordStart(c byte) bool { return c == '_' || (c|0x20 >= 'a' && c|0x20 <= 'z') || c >= 0x80 }

// parser is a cursor over one statement's tokens.
type parser struct {
	toks []token
	i    int
	// paramOIDs[n-1] is the type inferred for $n from where it appears.
	paramOIDs []uint32
}

// accept consumes the given words or punctuation if they come next, in order.
func (p *parser) accept(words ...string) bool {
	if p.i+len(words) > len(p.toks) {
		return false
	}
	for k, w := range words {
		t := p.toks[p.i+k]
		if (t.kind != 'w' && t.kind != 'o') || t.text != w {
			return false
		}
	}
	p.i += len(words)
	return true
}

func (p *parser) done() bool { return p.i == len(p.toks) }

func (p *parser) peekPunct(s string) bool {
	return p.i < len(p.toks) && p.toks[p.i].kind == 'o' && p.toks[p.i].text == s
}

func (p *parser) ident() (string, bool) {
	if p.i < len(p.toks) && (p.toks[p.i].kind == 'w' || p.toks[p.i].kind == 'q') {
		p.i++
		return p.toks[p.i-1].text, true
	}
	return "", false
}

// tableName parses a table name, possibly schema-qualified; "public." is
// dropped, other schemas are kept so that the table is not found (42P01), as
// crdb_internal.* on PostgreSQL.
func (p *parser) tableName() (string, bool) {
	name, ok := p.ident()
	if !ok {
		return "", false
	}
	if p.accept(".") {
		rel, ok := p.ident()
		if !ok {
			return "", false
		}
		if name == "public" {
			return rel, true
		}
		return name + "." + rel, true
	}
	return name, true
}

// identList parses "a, b, c".
func (p *parser) identList() ([]string, bool) {
	var names []string
	for {
		n, ok := p.ident()
		if !ok {
			return nil, false
		}
		names = append(names, n)
		if !p.accept(",") {
			return names, true
		}
	}
}

// expr is a literal or a parameter, with an optional cast.
type expr struct {
	param int // $n, or 0 for a literal
	lit   any
	oid   uint32 // the cast's type, or the literal's; 0 for an uncast parameter
}

// value parses a literal, $n, or (-)number, with an optional ::type cast.
// want is the type the context expects, used to infer a parameter's type.
func (p *parser) value(want uint32) (expr, bool) {
	start := p.i
	paren := p.accept("(")
	neg := p.accept("-")
	var e expr
	if p.i >= len(p.toks) {
		p.i = start
		return e, false
	}
	t := p.toks[p.i]
	switch t.kind {
	case 'p':
		n, err := strconv.Atoi(t.text)
		if err != nil || n < 1 || n > 65535 || neg {
			p.i = start
			return e, false
		}
		e.param = n
	case 'n':
		if n, err := strconv.ParseInt(t.text, 10, 64); err == nil {
			if neg {
				n = -n
			}
			e.lit, e.oid = n, oidInt4
			if n > math.MaxInt32 || n < math.MinInt32 {
				e.oid = oidInt8
			}
		} else if f, err := strconv.ParseFloat(t.text, 64); err == nil {
			if neg {
				f = -f
			}
			// PostgreSQL would say numeric; float8 is close enough here.
			e.lit, e.oid = f, oidFloat8
		} else {
			p.i = start
			return e, false
		}
	case 's':
		if neg {
			p.i = start
			return e, false
		}
		e.lit, e.oid = t.text, oidText
	case 'w':
		switch {
		case t.text == "null" && !neg:
			e.lit = nil
		case (t.text == "true" || t.text == "false") && !neg:
			e.lit, e.oid = t.text == "true", oidBool
		default:
			p.i = start
			return e, false
		}
	default:
		p.i = start
		return e, false
	}
	p.i++
	if paren && !p.accept(")") {
		p.i = start
		return expr{}, false
	}
	if p.accept("::") {
		name, ok := p.ident()
		oid, known := typeNames[name]
		if !ok || !known {
			p.i = start
			return expr{}, false
		}
		e.oid = oid
	}
	if e.param > 0 {
		for len(p.paramOIDs) < e.param {
			p.paramOIDs = append(p.paramOIDs, 0)
		}
		if e.oid != 0 {
			p.paramOIDs[e.param-1] = e.oid
		} else if p.paramOIDs[e.param-1] == 0 {
			p.paramOIDs[e.param-1] = want
		}
	}
	return e, true
}

// eval returns the expression's value, converted to oid when oid != 0.
func (e expr) eval(args []any, oid uint32) (any, error) {
	v := e.lit
	if e.param > 0 {
		if e.param > len(args) {
			return nil, errorf("42P02", fmt.Sprintf("there is no parameter $%d", e.param))
		}
		v = args[e.param-1]
	}
	if e.oid != 0 {
		var err error
		if v, err = coerce(v, e.oid); err != nil {
			return nil, err
		}
	}
	if oid != 0 {
		return coerce(v, oid)
	}
	return v, nil
}

type column struct {
	name string
	oid  uint32
}

type planKind int

const (
	kindOther planKind = iota
	kindEmpty
	kindBegin
	kindCommit
	kindRollback
)

// plan is a parsed statement, ready to run with its parameters.
type plan struct {
	kind      planKind
	numParams int
	paramOIDs []uint32
	cols      []column // nil: the statement returns no rows (NoData)
	exec      func(ctx context.Context, s *session, args []any) (rows [][]any, tag string, err error)
}

func notSupported(toks []token) error {
	var b strings.Builder
	for i, t := range toks {
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(t.text)
	}
	return errorf("0A000", fmt.Sprintf("fakepg: statement not supported: %q", b.String()))
}

func syntaxError(toks []token, at int) error {
	near := "end of input"
	if at < len(toks) {
		near = "\"" + toks[at].text + "\""
	}
	return errorf("42601", "syntax error at or near "+near)
}

func (srv *Server) planTokens(toks []token) (*plan, error) {
	p := &parser{toks: toks}
	var pl *plan
	var err error
	switch {
	case p.accept("select"):
		pl, err = srv.planSelect(p)
	case p.accept("insert", "into"):
		pl, err = srv.planInsert(p, false)
	case p.accept("upsert", "into"):
		pl, err = srv.planInsert(p, true)
	case p.accept("update"):
		pl, err = srv.planUpdate(p)
	case p.accept("delete", "from"):
		pl, err = srv.planDelete(p)
	case p.accept("create", "table"):
		pl, err = srv.planCreate(p)
	case p.accept("drop", "table"):
		pl, err = srv.planDrop(p)
	case p.accept("truncate"):
		p.accept("table")
		pl, err = srv.planTruncate(p)
	case p.accept("begin"), p.accept("start", "transaction"):
		p.accept("transaction")
		p.accept("work")
		pl = &plan{kind: kindBegin, exec: execBegin}
		p.i = len(p.toks) // isolation levels and the like are accepted and ignored
	case p.accept("commit"), p.accept("end"):
		pl = &plan{kind: kindCommit, exec: execCommit}
	case p.accept("rollback"), p.accept("abort"):
		pl = &plan{kind: kindRollback, exec: execRollback}
	case p.accept("set"), p.accept("reset"):
		tag := "SET"
		if toks[0].text == "reset" {
			tag = "RESET"
		}
		p.i = len(p.toks)
		pl = &plan{exec: fixedTag(tag)}
	case p.accept("discard", "all"):
		pl = &plan{exec: func(ctx context.Context, s *session, _ []any) ([][]any, string, error) {
			clear(s.stmts)
			return nil, "DISCARD ALL", nil
		}}
	case p.accept("deallocate"):
		p.accept("prepare")
		if p.accept("all") {
			pl = &plan{exec: func(ctx context.Context, s *session, _ []any) ([][]any, string, error) {
				clear(s.stmts)
				return nil, "DEALLOCATE ALL", nil
			}}
		} else if name, ok := p.ident(); ok {
			pl = &plan{exec: func(ctx context.Context, s *session, _ []any) ([][]any, string, error) {
				delete(s.stmts, name)
				return nil, "DEALLOCATE", nil
			}}
		}
	default:
		if toks[0].kind == 'w' && knownKeywords[toks[0].text] {
			return nil, notSupported(toks)
		}
		return nil, syntaxError(toks, 0)
	}
	if err != nil {
		return nil, err
	}
	if pl == nil {
		return nil, notSupported(toks)
	}
	if !p.done() {
		return nil, notSupported(toks)
	}
	pl.paramOIDs = p.paramOIDs
	pl.numParams = len(p.paramOIDs)
	return pl, nil
}

// knownKeywords start statements PostgreSQL has but fakepg does not answer.
var knownKeywords = map[string]bool{
	"alter": true, "analyze": true, "call": true, "copy": true, "declare": true, "do": true,
	"execute": true, "explain": true, "fetch": true, "grant": true, "listen": true, "lock": true,
	"notify": true, "prepare": true, "release": true, "revoke": true, "savepoint": true, "show": true,
	"table": true, "unlisten": true, "vacuum": true, "values": true, "with": true, "create": true,
	"drop": true, "insert": true, "delete": true,
}

func fixedTag(tag string) func(context.Context, *session, []any) ([][]any, string, error) {
	return func(context.Context, *session, []any) ([][]any, string, error) { return nil, tag, nil }
}

func execBegin(_ context.Context, s *session, _ []any) ([][]any, string, error) {
	if s.tx == 'I' {
		s.tx = 'T'
		s.undo = s.undo[:0]
	}
	// Inside a transaction PostgreSQL only warns; so does fakepg, silently.
	return nil, "BEGIN", nil
}

func execCommit(_ context.Context, s *session, _ []any) ([][]any, string, error) {
	if s.tx == 'E' {
		s.rollback()
		return nil, "ROLLBACK", nil
	}
	s.tx = 'I'
	s.undo = s.undo[:0]
	return nil, "COMMIT", nil
}

func execRollback(_ context.Context, s *session, _ []any) ([][]any, string, error) {
	s.rollback()
	return nil, "ROLLBACK", nil
}

func (srv *Server) planSelect(p *parser) (*plan, error) {
	switch {
	case p.accept("pg_sleep", "("):
		e, ok := p.value(oidFloat8)
		if !ok || !p.accept(")") {
			return nil, syntaxError(p.toks, p.i)
		}
		return &plan{
			cols: []column{{"pg_sleep", oidVoid}},
			exec: func(ctx context.Context, s *session, args []any) ([][]any, string, error) {
				v, err := e.eval(args, oidFloat8)
				if err != nil {
					return nil, "", err
				}
				secs, _ := v.(float64)
				if err := s.sleep(ctx, time.Duration(secs*float64(time.Second))); err != nil {
					return nil, "", err
				}
				return [][]any{{""}}, "SELECT 1", nil
			},
		}, nil
	case p.accept("version", "(", ")"):
		return &plan{
			cols: []column{{"version", oidText}},
			exec: func(context.Context, *session, []any) ([][]any, string, error) {
				return [][]any{{"PostgreSQL 15.0 (fakepg, in-process)"}}, "SELECT 1", nil
			},
		}, nil
	case p.accept("inet_server_addr", "(", ")"), p.accept("host", "(", "inet_server_addr", "(", ")", ")"):
		addrCol := column{"inet_server_addr", oidInet}
		if p.toks[1].text == "host" {
			addrCol = column{"host", oidText}
		} else if p.accept("::", "text") {
			addrCol.oid = oidText
		}
		if !p.accept(",", "inet_server_port", "(", ")") {
			return nil, notSupported(p.toks)
		}
		return &plan{
			cols: []column{addrCol, {"inet_server_port", oidInt4}},
			exec: func(_ context.Context, s *session, _ []any) ([][]any, string, error) {
				ip, port := s.localAddr()
				var addr any = ip
				if addrCol.name == "host" {
					addr = ip.String()
				} else if addrCol.oid == oidText {
					addr = textOf(ip)
				}
				return [][]any{{addr, int64(port)}}, "SELECT 1", nil
			},
		}, nil
	case p.accept("count", "(", "*", ")", "from"):
		name, ok := p.tableName()
		if !ok {
			return nil, syntaxError(p.toks, p.i)
		}
		if _, err := srv.tableDef(name); err != nil {
			return nil, err
		}
		return &plan{
			cols: []column{{"count", oidInt8}},
			exec: func(_ context.Context, s *session, _ []any) ([][]any, string, error) {
				srv.dataMu.Lock()
				defer srv.dataMu.Unlock()
				t := srv.tables[name]
				if t == nil {
					return nil, "", undefinedTable(name)
				}
				return [][]any{{int64(len(t.rows))}}, "SELECT 1", nil
			},
		}, nil
	}

	// A single literal or parameter: SELECT 1, SELECT $1::int.
	if e, ok := p.value(oidText); ok {
		name := "?column?"
		if p.accept("as") {
			n, ok := p.ident()
			if !ok {
				return nil, syntaxError(p.toks, p.i)
			}
			name = n
		}
		oid := e.oid
		if oid == 0 {
			oid = oidText
		}
		if e.param == 0 && e.lit == nil {
			oid = oidText
		}
		return &plan{
			cols: []column{{name, oid}},
			exec: func(_ context.Context, _ *session, args []any) ([][]any, string, error) {
				v, err := e.eval(args, oid)
				if err != nil {
					return nil, "", err
				}
				return [][]any{{v}}, "SELECT 1", nil
			},
		}, nil
	}

	// SELECT cols FROM t [WHERE key = value]
	var names []string
	star := p.accept("*")
	if !star {
		var ok bool
		if names, ok = p.identList(); !ok {
			return nil, notSupported(p.toks)
		}
	}
	if !p.accept("from") {
		return nil, notSupported(p.toks)
	}
	tname, ok := p.tableName()
	if !ok {
		return nil, syntaxError(p.toks, p.i)
	}
	def, err := srv.tableDef(tname)
	if err != nil {
		return nil, err
	}
	var idx []int
	if star {
		for i := range def.cols {
			idx = append(idx, i)
		}
	} else {
		for _, n := range names {
			i := def.colIndex(n)
			if i < 0 {
				return nil, undefinedColumn(n)
			}
			idx = append(idx, i)
		}
	}
	cols := make([]column, len(idx))
	for k, i := range idx {
		cols[k] = def.cols[i]
	}
	where, hasWhere, err := p.whereKey(def)
	if err != nil {
		return nil, err
	}
	return &plan{
		cols: cols,
		exec: func(_ context.Context, s *session, args []any) ([][]any, string, error) {
			var key string
			if hasWhere {
				v, err := where.eval(args, def.cols[def.key].oid)
				if err != nil {
					return nil, "", err
				}
				if v == nil {
					return nil, "SELECT 0", nil
				}
				key = textOf(v)
			}
			srv.dataMu.Lock()
			defer srv.dataMu.Unlock()
			t := srv.tables[tname]
			if t == nil {
				return nil, "", undefinedTable(tname)
			}
			var matched [][]any
			if hasWhere {
				if r, ok := t.rows[key]; ok {
					matched = append(matched, r)
				}
			} else {
				keys := make([]string, 0, len(t.rows))
				for k := range t.rows {
					keys = append(keys, k)
				}
				sort.Strings(keys)
				for _, k := range keys {
					matched = append(matched, t.rows[k])
				}
			}
			out := make([][]any, len(matched))
			for r, row := range matched {
				out[r] = make([]any, len(idx))
				for k, i := range idx {
					out[r][k] = row[i]
				}
			}
			return out, "SELECT " + strconv.Itoa(len(out)), nil
		},
	}, nil
}

// whereKey parses an optional "WHERE key = value"; only the key column may
// be compared.
func (p *parser) whereKey(def *table) (expr, bool, error) {
	if !p.accept("where") {
		return expr{}, false, nil
	}
	col, ok := p.ident()
	if !ok || !p.accept("=") {
		return expr{}, false, syntaxError(p.toks, p.i)
	}
	i := def.colIndex(col)
	if i < 0 {
		return expr{}, false, undefinedColumn(col)
	}
	if i != def.key {
		return expr{}, false, errorf("0A000", "fakepg: WHERE supports only the key column "+def.cols[def.key].name)
	}
	e, ok := p.value(def.cols[i].oid)
	if !ok {
		return expr{}, false, notSupported(p.toks)
	}
	return e, true, nil
}

func (srv *Server) planInsert(p *parser, upsert bool) (*plan, error) {
	tname, ok := p.tableName()
	if !ok {
		return nil, syntaxError(p.toks, p.i)
	}
	def, err := srv.tableDef(tname)
	if err != nil {
		return nil, err
	}
	var names []string
	if p.accept("(") {
		if names, ok = p.identList(); !ok || !p.accept(")") {
			return nil, syntaxError(p.toks, p.i)
		}
	} else {
		for _, c := range def.cols {
			names = append(names, c.name)
		}
	}
	idx := make([]int, len(names))
	for k, n := range names {
		if idx[k] = def.colIndex(n); idx[k] < 0 {
			return nil, undefinedColumn(n)
		}
	}
	if !p.accept("values", "(") {
		return nil, notSupported(p.toks)
	}
	vals := make([]expr, len(idx))
	for k := range idx {
		if k > 0 && !p.accept(",") {
			return nil, errorf("42601", "INSERT has more target columns than expressions")
		}
		if vals[k], ok = p.value(def.cols[idx[k]].oid); !ok {
			return nil, notSupported(p.toks)
		}
	}
	if !p.accept(")") {
		return nil, errorf("42601", "INSERT has more expressions than target columns")
	}
	// What to do when the key exists: fail, keep the old row, or overwrite
	// the listed columns.
	onConflict := "error"
	if upsert {
		onConflict = "update"
	} else if p.accept("on", "conflict") {
		if p.accept("(") {
			if _, ok := p.identList(); !ok || !p.accept(")") {
				return nil, syntaxError(p.toks, p.i)
			}
		}
		switch {
		case p.accept("do", "nothing"):
			onConflict = "nothing"
		case p.accept("do", "update", "set"):
			onConflict = "update"
			for {
				c, ok := p.ident()
				if !ok || !p.accept("=") || !p.accept("excluded", ".") {
					return nil, notSupported(p.toks)
				}
				if c2, ok := p.ident(); !ok || c2 != c {
					return nil, notSupported(p.toks)
				}
				if !p.accept(",") {
					break
				}
			}
		default:
			return nil, notSupported(p.toks)
		}
	}
	return &plan{
		exec: func(_ context.Context, s *session, args []any) ([][]any, string, error) {
			row := make([]any, len(def.cols))
			set := make([]bool, len(def.cols))
			for k, i := range idx {
				v, err := vals[k].eval(args, def.cols[i].oid)
				if err != nil {
					return nil, "", err
				}
				row[i], set[i] = v, true
			}
			if row[def.key] == nil {
				return nil, "", errorf("23502", "null value in column \""+def.cols[def.key].name+"\" violates not-null constraint")
			}
			key := textOf(row[def.key])
			srv.dataMu.Lock()
			defer srv.dataMu.Unlock()
			t := srv.tables[tname]
			if t == nil {
				return nil, "", undefinedTable(tname)
			}
			old, exists := t.rows[key]
			if exists {
				switch onConflict {
				case "error":
					return nil, "", errorf("23505", "duplicate key value violates unique constraint \""+tname+"_pkey\"")
				case "nothing":
					return nil, "INSERT 0 0", nil
				}
				merged := append([]any(nil), old...)
				for i := range row {
					if set[i] {
						merged[i] = row[i]
					}
				}
				row = merged
			}
			s.writeLocked(t, key, row)
			return nil, "INSERT 0 1", nil
		},
	}, nil
}

func (srv *Server) planUpdate(p *parser) (*plan, error) {
	tname, ok := p.tableName()
	if !ok || !p.accept("set") {
		return nil, syntaxError(p.toks, p.i)
	}
	def, err := srv.tableDef(tname)
	if err != nil {
		return nil, err
	}
	col, ok := p.ident()
	if !ok || !p.accept("=") {
		return nil, syntaxError(p.toks, p.i)
	}
	ci := def.colIndex(col)
	if ci < 0 {
		return nil, undefinedColumn(col)
	}
	// c = value, or c = c + value (an increment: not idempotent, which is
	// what tests of retry safety need).
	increment := false
	if p.accept(col, "+") {
		if !isIntType(def.cols[ci].oid) {
			return nil, errorf("0A000", "fakepg: only integer columns can be incremented")
		}
		increment = true
	}
	val, ok := p.value(def.cols[ci].oid)
	if !ok {
		return nil, notSupported(p.toks)
	}
	where, hasWhere, err := p.whereKey(def)
	if err != nil {
		return nil, err
	}
	if !hasWhere {
		return nil, errorf("0A000", "fakepg: UPDATE needs WHERE "+def.cols[def.key].name+" = ...")
	}
	return &plan{
		exec: func(_ context.Context, s *session, args []any) ([][]any, string, error) {
			v, err := val.eval(args, def.cols[ci].oid)
			if err != nil {
				return nil, "", err
			}
			k, err := where.eval(args, def.cols[def.key].oid)
			if err != nil {
				return nil, "", err
			}
			srv.dataMu.Lock()
			defer srv.dataMu.Unlock()
			t := srv.tables[tname]
			if t == nil {
				return nil, "", undefinedTable(tname)
			}
			key := textOf(k)
			old, exists := t.rows[key]
			if k == nil || !exists {
				return nil, "UPDATE 0", nil
			}
			row := append([]any(nil), old...)
			if increment {
				a, _ := row[ci].(int64)
				b, _ := v.(int64)
				if row[ci] == nil || v == nil {
					row[ci] = nil
				} else {
					row[ci] = a + b
				}
			} else {
				row[ci] = v
			}
			if ci == def.key {
				return nil, "", errorf("0A000", "fakepg: updating the key column is not supported")
			}
			s.writeLocked(t, key, row)
			return nil, "UPDATE 1", nil
		},
	}, nil
}

func (srv *Server) planDelete(p *parser) (*plan, error) {
	tname, ok := p.tableName()
	if !ok {
		return nil, syntaxError(p.toks, p.i)
	}
	def, err := srv.tableDef(tname)
	if err != nil {
		return nil, err
	}
	where, hasWhere, err := p.whereKey(def)
	if err != nil {
		return nil, err
	}
	return &plan{
		exec: func(_ context.Context, s *session, args []any) ([][]any, string, error) {
			var key string
			if hasWhere {
				k, err := where.eval(args, def.cols[def.key].oid)
				if err != nil {
					return nil, "", err
				}
				if k == nil {
					return nil, "DELETE 0", nil
				}
				key = textOf(k)
			}
			srv.dataMu.Lock()
			defer srv.dataMu.Unlock()
			t := srv.tables[tname]
			if t == nil {
				return nil, "", undefinedTable(tname)
			}
			n := 0
			for k := range t.rows {
				if !hasWhere || k == key {
					s.writeLocked(t, k, nil)
					n++
				}
			}
			return nil, "DELETE " + strconv.Itoa(n), nil
		},
	}, nil
}

func (srv *Server) planCreate(p *parser) (*plan, error) {
	ifNotExists := p.accept("if", "not", "exists")
	name, ok := p.tableName()
	if !ok || !p.accept("(") {
		return nil, syntaxError(p.toks, p.i)
	}
	def := &table{name: name, key: -1}
	for {
		if p.accept("primary", "key", "(") {
			k, ok := p.ident()
			if !ok || !p.accept(")") {
				return nil, syntaxError(p.toks, p.i)
			}
			if def.key = def.colIndex(k); def.key < 0 {
				return nil, undefinedColumn(k)
			}
		} else {
			cname, ok := p.ident()
			if !ok {
				return nil, syntaxError(p.toks, p.i)
			}
			tname, ok := p.tableName()
			oid, known := typeNames[tname]
			if !ok || !known {
				return nil, errorf("0A000", "fakepg: column type not supported: "+tname)
			}
			if p.accept("(") { // varchar(255) and the like
				for !p.done() && !p.accept(")") {
					p.i++
				}
			}
			def.cols = append(def.cols, column{cname, oid})
			// Column constraints: PRIMARY KEY marks the key; the rest
			// (NOT NULL, DEFAULT ...) is accepted and ignored.
			for !p.done() && !p.peekPunct(",") && !p.peekPunct(")") {
				if p.accept("primary", "key") {
					def.key = len(def.cols) - 1
					continue
				}
				p.i++
			}
		}
		if p.accept(")") {
			break
		}
		if !p.accept(",") {
			return nil, syntaxError(p.toks, p.i)
		}
	}
	if len(def.cols) == 0 {
		return nil, errorf("0A000", "fakepg: a table needs at least one column")
	}
	if def.key < 0 {
		def.key = 0 // no primary key: the first column acts as one
	}
	return &plan{
		exec: func(context.Context, *session, []any) ([][]any, string, error) {
			srv.dataMu.Lock()
			defer srv.dataMu.Unlock()
			if _, exists := srv.tables[name]; exists {
				if ifNotExists {
					return nil, "CREATE TABLE", nil
				}
				return nil, "", errorf("42P07", "relation \""+name+"\" already exists")
			}
			t := *def
			t.rows = make(map[string][]any)
			srv.tables[name] = &t
			return nil, "CREATE TABLE", nil
		},
	}, nil
}

func (srv *Server) planDrop(p *parser) (*plan, error) {
	ifExists := p.accept("if", "exists")
	name, ok := p.tableName()
	if !ok {
		return nil, syntaxError(p.toks, p.i)
	}
	return &plan{
		exec: func(context.Context, *session, []any) ([][]any, string, error) {
			srv.dataMu.Lock()
			defer srv.dataMu.Unlock()
			if _, exists := srv.tables[name]; !exists && !ifExists {
				return nil, "", undefinedTable(name)
			}
			// Dropping is not undone by ROLLBACK.
			delete(srv.tables, name)
			return nil, "DROP TABLE", nil
		},
	}, nil
}

func (srv *Server) planTruncate(p *parser) (*plan, error) {
	name, ok := p.tableName()
	if !ok {
		return nil, syntaxError(p.toks, p.i)
	}
	if _, err := srv.tableDef(name); err != nil {
		return nil, err
	}
	return &plan{
		exec: func(_ context.Context, s *session, _ []any) ([][]any, string, error) {
			srv.dataMu.Lock()
			defer srv.dataMu.Unlock()
			t := srv.tables[name]
			if t == nil {
				return nil, "", undefinedTable(name)
			}
			for k := range t.rows {
				s.writeLocked(t, k, nil)
			}
			return nil, "TRUNCATE TABLE", nil
		},
	}, nil
}
