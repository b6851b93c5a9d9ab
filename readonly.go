package clusterpool

import (
	"strings"
)

// readOnlySQL reports whether sql certainly cannot change data, by a
// deliberately conservative textual rule (a false "no" only costs a retry; a
// false "yes" could apply a write twice). It says yes only for one SELECT,
// SHOW or VALUES statement that
//   - has no ';' except trailing ones (one statement),
//   - contains none of the words INTO, FOR (locking clauses), INSERT, UPDATE,
//     DELETE, UPSERT, MERGE, CALL, DO, COPY, LOCK, NEXTVAL, SETVAL (in any case,
//     anywhere, even inside string literals), and
//   - calls no function other than a short list of unqualified built-ins
//     known not to write (count, sum, min, max, avg, coalesce, now, ...): a
//     user function, a schema-qualified or quoted name, or nextval could
//     write, so "SELECT f()" is not read-only.
//
// WITH queries are not read-only by this rule (a CTE may modify data), nor is
// EXPLAIN (EXPLAIN ANALYZE runs the statement). Mark other work with
// WithIdempotent or run it in a BeginTx with pgx.ReadOnly.
func readOnlySQL(sql string) bool {
	s := skipSpaceAndComments(sql)
	first, rest := nextWord(s)
	switch strings.ToLower(first) {
	case "select", "show", "values":
	default:
		return false
	}
	if i := strings.IndexByte(rest, ';'); i >= 0 && strings.TrimRight(rest[i:], "; \t\r\n") != "" {
		return false
	}
	// prevWord is the word (lower case) just before the current position,
	// ignoring white space; qualified is true when it followed a '.'.
	prevWord, qualified, dot := "", false, false
	for i := 0; i < len(rest); {
		c := rest[i]
		switch {
		case isWordByte(c):
			j := i
			for j < len(rest) && isWordByte(rest[j]) {
				j++
			}
			w := strings.ToLower(rest[i:j])
			if isWriteWord(w) {
				return false
			}
			prevWord, qualified, dot = w, dot, false
			i = j
		case c == '"':
			// A quoted identifier: a call of it is never known to be pure.
			j := strings.IndexByte(rest[i+1:], '"')
			if j < 0 {
				return false
			}
			prevWord, qualified, dot = `"`, dot, false
			i += j + 2
		case c == '(':
			// A '(' right after a name is a call (or a type modifier);
			// after anything else it is a subquery or grouping. Only
			// unqualified built-ins pass: schema.count() may be anything.
			if prevWord != "" && (qualified || !isPureCallWord(prevWord)) {
				return false
			}
			prevWord, dot = "", false
			i++
		case c == ' ' || c == '\t' || c == '\r' || c == '\n':
			i++
		default:
			prevWord, dot = "", c == '.'
			i++
		}
	}
	return true
}

// isWriteWord reports whether w makes a statement not read-only wherever it
// appears.
func isWriteWord(w string) bool {
	switch w {
	case "into", "for", "insert", "update", "delete", "upsert", "merge",
		"call", "do", "copy", "lock", "nextval", "setval":
		return true
	}
	return false
}

// isPureCallWord reports whether w may stand right before '(' in a read-only
// statement: a keyword that introduces a subquery or a list, or a built-in
// function that does not write.
func isPureCallWord(w string) bool {
	switch w {
	case "in", "exists", "any", "all", "some", "from", "join", "values",
		"where", "and", "or", "not", "on", "as", "select", "by", "having",
		"array", "row", "over", "filter", "within",
		"count", "sum", "min", "max", "avg", "coalesce", "nullif",
		"greatest", "least", "lower", "upper", "length", "abs", "round",
		"floor", "ceil", "now", "cast", "extract", "substring", "trim",
		"concat", "array_agg", "string_agg", "json_agg", "jsonb_agg",
		"pg_sleep", "version":
		return true
	}
	return false
}

func isWordByte(c byte) bool {
	return c == '_' || c == '$' || c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= 0x80
}

func nextWord(s string) (word, rest string) {
	i := 0
	for i < len(s) && isWordByte(s[i]) {
		i++
	}
	return s[:i], s[i:]
}

// skipSpaceAndComments drops leading white space and SQL comments.
func skipSpaceAndComments(s string) string {
	for {
		s = strings.TrimLeft(s, " \t\r\n")
		switch {
		case strings.HasPrefix(s, "--"):
			i := strings.IndexByte(s, '\n')
			if i < 0 {
				return ""
			}
			s = s[i+1:]
		case strings.HasPrefix(s, "/*"):
			i := strings.Index(s, "*/")
			if i < 0 {
				return ""
			}
			s = s[i+2:]
		default:
			return s
		}
	}
}
