package clusterpool

// Connection-string tokenizing: splitting the cluster_* parameters out of a
// connection string before pgx parses it, and masking passwords in pgx's
// parse errors. Both read the string as pgconn does, in its two forms: a
// URL (postgres:// or postgresql://) and keyword/value pairs.

import (
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"
)

// redactMask replaces a password in an error.
const redactMask = "xxxxx"

// parseError is pgx's error for a connection string that does not parse,
// with every password in it masked. It unwraps to a copy of pgx's
// *pgconn.ParseConfigError whose ConnString is masked the same way, or to
// pgx's error itself when that is something else.
type parseError struct {
	msg string
	err error
}

func (e *parseError) Error() string { return e.msg }
func (e *parseError) Unwrap() error { return e.err }

// redactParseError masks every password of connString in pgx's parse error
// for it. pgx masks the passwords it recognizes too, but on a best-effort
// basis: a keyword/value password holding an escaped quote, for one, leaks
// its tail. Here the string is masked by a tokenizer that reads pairs as
// pgconn does and carries on where pgconn stops with an error, and any
// spelling of a password left in pgx's own message is masked as well.
func redactParseError(connString string, err error) error {
	masked, secrets := redactConnString(connString)
	var pce *pgconn.ParseConfigError
	if !errors.As(err, &pce) || error(pce) != err {
		// Not pgx's parse error itself: the message is masked, and the
		// error stays behind it for errors.Is and errors.As.
		return &parseError{msg: "clusterpool: " + maskSecrets(err.Error(), secrets), err: err}
	}
	// pgx's message is "cannot parse `<string>`: <detail>"; the detail
	// alone comes from a copy without the string.
	safe := *pce
	safe.ConnString = ""
	detail := strings.TrimPrefix(safe.Error(), "cannot parse ``: ")
	safe.ConnString = masked
	return &parseError{
		msg: fmt.Sprintf("clusterpool: cannot parse `%s`: %s", masked, maskSecrets(detail, secrets)),
		err: &safe,
	}
}

// maskSecrets replaces each secret in s. Secrets shorter than 3 bytes are
// left alone: masking every "a" of a message would destroy it and hide
// nothing.
func maskSecrets(s string, secrets []string) string {
	for _, secret := range secrets {
		if len(secret) >= 3 {
			s = strings.ReplaceAll(s, secret, redactMask)
		}
	}
	return s
}

// redactConnString returns connString with the values of its password and
// sslpassword parameters (and a URL's userinfo password) masked, and those
// values as written and as decoded.
func redactConnString(connString string) (string, []string) {
	for _, prefix := range []string{"postgres://", "postgresql://"} {
		if rest, ok := strings.CutPrefix(connString, prefix); ok {
			masked, secrets := redactURL(rest)
			return prefix + masked, secrets
		}
	}
	return redactKeywordValue(connString)
}

func isPasswordKey(key string) bool { return key == "password" || key == "sslpassword" }

// redactURL masks the passwords of a URL without its scheme.
func redactURL(s string) (string, []string) {
	var b strings.Builder
	var secrets []string
	if i := strings.IndexAny(s, "@/"); i >= 0 && s[i] == '@' {
		user, pw, ok := strings.Cut(s[:i], ":")
		b.WriteString(user)
		if ok {
			b.WriteString(":" + redactMask)
			secrets = append(secrets, pw, decodeLenient(pw))
		}
		b.WriteByte('@')
		s = s[i+1:]
	} else if at := strings.LastIndexByte(s, '@'); at >= 0 {
		// An unescaped '/' in the password ends the userinfo before its '@'
		// (postgres://u:pass/word@h): everything from the first ':' to the
		// last '@' may be password.
		if colon := strings.IndexByte(s[:at], ':'); colon >= 0 {
			secrets = append(secrets, s[colon+1:at])
			b.WriteString(s[:colon+1] + redactMask)
			s = s[at:]
		}
	}
	base, query, ok := strings.Cut(s, "?")
	b.WriteString(base)
	if !ok {
		return b.String(), secrets
	}
	b.WriteByte('?')
	for i, item := range strings.Split(query, "&") {
		if i > 0 {
			b.WriteByte('&')
		}
		rawKey, rawValue, ok := strings.Cut(item, "=")
		if !ok || !isPasswordKey(strings.TrimSpace(decodeLenient(rawKey))) {
			b.WriteString(item)
			continue
		}
		b.WriteString(rawKey + "=" + redactMask)
		secrets = append(secrets, rawValue, decodeLenient(rawValue))
	}
	return b.String(), secrets
}

// decodeLenient decodes %XX escapes and keeps malformed ones as they are.
func decodeLenient(s string) string {
	if v, err := url.PathUnescape(s); err == nil {
		return v
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '%' && i+2 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+3], 16, 8); err == nil {
				b.WriteByte(byte(v))
				i += 2
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// redactKeywordValue masks the password values of a keyword/value string.
// It reads pairs as extractFromKeywordValue does, but a malformed pair does
// not stop it: the keyword is the last word before each '=', and an
// unterminated quote runs to the end of the string.
func redactKeywordValue(s string) (string, []string) {
	var b strings.Builder
	var secrets []string
	for {
		eq := strings.IndexByte(s, '=')
		if eq < 0 {
			b.WriteString(s)
			return b.String(), secrets
		}
		var key string
		if words := strings.Fields(s[:eq]); len(words) > 0 {
			key = words[len(words)-1]
		}
		b.WriteString(s[:eq+1])
		s = s[eq+1:]
		spaces := len(s) - len(strings.TrimLeft(s, asciiSpace))
		b.WriteString(s[:spaces])
		s = s[spaces:]
		raw, value, _ := readKeywordValue(s)
		s = s[len(raw):]
		if isPasswordKey(key) {
			b.WriteString(redactMask)
			secrets = append(secrets, raw, value)
		} else {
			b.WriteString(raw)
		}
	}
}

// readKeywordValue reads the value at the start of s as pgconn does:
// single-quoted (to the closing quote) or up to the next space, with
// backslash escapes either way. It returns the value as written and its
// meaning; closed is false for a quote that never closes, whose raw value
// runs to the end of s.
func readKeywordValue(s string) (raw, value string, closed bool) {
	var v strings.Builder
	quoted := strings.HasPrefix(s, "'")
	i := 0
	if quoted {
		i = 1
	}
	for ; i < len(s); i++ {
		c := s[i]
		if quoted && c == '\'' {
			return s[:i+1], v.String(), true
		}
		if !quoted && strings.IndexByte(asciiSpace, c) >= 0 {
			break
		}
		if c == '\\' && i+1 < len(s) {
			i++
			c = s[i]
		}
		v.WriteByte(c)
	}
	return s[:i], v.String(), !quoted
}

type clusterParam struct{ key, value string }

// extractClusterParams splits the cluster_* parameters out of connString and
// returns the rest unchanged for pgxpool.ParseConfig. It follows pgconn's two
// forms: a URL (postgres:// or postgresql://) and keyword/value pairs.
func extractClusterParams(connString string) (string, []clusterParam, error) {
	if strings.HasPrefix(connString, "postgres://") || strings.HasPrefix(connString, "postgresql://") {
		return extractFromURL(connString)
	}
	return extractFromKeywordValue(connString)
}

func extractFromURL(connString string) (string, []clusterParam, error) {
	// Like pgx (and libpq), only a '/' ends the search for the userinfo: a
	// '@' before it ends a user:password that may itself contain '?'.
	afterUser := len("postgres://")
	if strings.HasPrefix(connString, "postgresql://") {
		afterUser = len("postgresql://")
	}
	if i := strings.IndexAny(connString[afterUser:], "@/"); i >= 0 && connString[afterUser+i] == '@' {
		afterUser += i + 1
	}
	q := strings.IndexByte(connString[afterUser:], '?')
	if q < 0 {
		return connString, nil, nil
	}
	q += afterUser
	base, query := connString[:q], connString[q+1:]
	var kept []string
	var params []clusterParam
	for _, item := range strings.Split(query, "&") {
		rawKey, rawValue, _ := strings.Cut(item, "=")
		// pgx decodes %XX but not '+', and ignores spaces around a key.
		key, err := url.PathUnescape(rawKey)
		key = strings.TrimSpace(key)
		if err != nil || !isClusterParam(key) {
			// Not ours (or malformed): pgx reports its own errors.
			kept = append(kept, item)
			continue
		}
		value, err := url.PathUnescape(rawValue)
		if err != nil {
			return "", nil, fmt.Errorf("clusterpool: %s: invalid URL escape in value", key)
		}
		params = append(params, clusterParam{key, strings.TrimSpace(value)})
	}
	if len(params) == 0 {
		return connString, nil, nil
	}
	if len(kept) == 0 {
		return base, params, nil
	}
	return base + "?" + strings.Join(kept, "&"), params, nil
}

// extractFromKeywordValue mirrors pgconn's keyword/value tokenizer: key, '='
// with optional spaces around it, then a value that is either single-quoted
// (backslash escapes, may contain spaces) or runs to the next space
// (backslash escapes). Pairs that are not cluster_* are kept verbatim.
func extractFromKeywordValue(connString string) (string, []clusterParam, error) {
	var kept []string
	var params []clusterParam
	s := connString
	for {
		s = strings.TrimLeft(s, asciiSpace)
		if s == "" {
			break
		}
		start := s
		eq := strings.IndexByte(s, '=')
		if eq < 0 {
			// Malformed: leave it to pgx, which reports it without secrets.
			return connString, nil, nil
		}
		key := strings.TrimRight(s[:eq], asciiSpace)
		s = strings.TrimLeft(s[eq+1:], asciiSpace)
		raw, value, closed := readKeywordValue(s)
		if !closed {
			return connString, nil, nil // unterminated quote: pgx reports it
		}
		s = s[len(raw):]
		pair := start[:len(start)-len(s)]
		if isClusterParam(key) {
			params = append(params, clusterParam{key, value})
		} else {
			kept = append(kept, pair)
		}
	}
	if len(params) == 0 {
		return connString, nil, nil
	}
	return strings.Join(kept, " "), params, nil
}

const asciiSpace = " \t\n\r\v\f"

// isClusterParam says whether a parameter is for ParseConfig rather than
// pgx: its lower-cased name starts with "cluster_". Upper-case spellings
// are taken out too, so that setParam reports them rather than the server
// receiving them as run-time parameters.
func isClusterParam(key string) bool {
	return strings.HasPrefix(strings.ToLower(key), paramPrefix)
}
