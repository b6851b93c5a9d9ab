package clusterpool

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// Fuzz tests. Their seed corpora are committed under testdata/fuzz/<Name>/
// and run with the ordinary tests; .ci/run also fuzzes each one for a few
// seconds. FuzzDecodeProcessID is in backendkey_test.go and
// FuzzExtractClusterParams in connstring_test.go.

// FuzzParseConfig parses connection strings in both forms, with a password
// written correctly for the form (escaped in a URL's userinfo, quoted as a
// keyword/value pair) among arbitrary other text and one cluster_*
// parameter, and checks that
//
//   - ParseConfig never panics;
//   - no error contains the password or any piece of it, in any spelling
//     found in the string, whether the error is ours or pgx's;
//   - an invalid cluster_* value is an error naming the parameter and the
//     quoted value, whatever else is wrong with the string;
//   - a string that parses keeps the password and the cluster setting.
func FuzzParseConfig(f *testing.F) {
	f.Add(false, "s3cr3t", "h:5432/db", "sslmode=disable", uint8(2), "3")
	f.Add(false, "p?w@/:#&%x", "h1:1,h2:2/db", "application_name=a", uint8(3), "NaN")
	f.Add(false, "s3cr3t", "h:abc/db", "", uint8(0), "-1s")
	f.Add(false, "s3cr3t", "h%zz/db", "", uint8(4), "magic")
	f.Add(false, "s3cr3t", "[::1/db", "x=%zz", uint8(1), "1ms")
	f.Add(false, "s3cr3t", "h/db", "pool_max_conns=zz", uint8(2), "-1")
	f.Add(true, "s3cr3t", "host=h user=u", "dbname=db", uint8(2), "7")
	f.Add(true, `a b\'c d`, "host=h", "port=x", uint8(4), "none")
	f.Add(true, "s3cr3t", "host=h c", "", uint8(3), "-Inf")
	f.Add(true, "s3cr3t pw", "host = h", "sslmode=bogus", uint8(0), "1h")
	f.Add(true, "s3cr3t", "x='", "'", uint8(2), "99999999999")
	f.Fuzz(func(t *testing.T, kv bool, password, before, after string, paramIndex uint8, value string) {
		// A password with a marker between any two of its bytes: an error
		// holding the marker holds a piece of the password, however short,
		// and not a coincidence.
		pw := passwordMarker + interleave(password, passwordMarker) + passwordMarker
		names := clusterParamNames()
		name := names[int(paramIndex)%len(names)]
		value = plainToken(value)
		var conn, pwText string
		if kv {
			// Nothing in before may turn the password pair into something
			// else: no quote or escape is left open, and a last keyword
			// with an empty value would take the pair as its value.
			before = strings.TrimRight(strings.NewReplacer("'", "", `\`, "").Replace(before), asciiSpace+"=")
			pwText = strings.NewReplacer(`\`, `\\`, "'", `\'`).Replace(pw)
			conn = before + " password='" + pwText + "' " + name + "=" + value + " " + after
		} else {
			// The userinfo ends at the first '@' or '/': our '@' is it.
			userinfo := url.UserPassword("u", pw).String()
			pwText = strings.TrimPrefix(userinfo, "u:")
			conn = "postgres://" + userinfo + "@" + before + "?" + name + "=" + value + "&" + after
		}
		spellings := []string{pw, pwText, strconv.Quote(pw)[1 : len(strconv.Quote(pw))-1]}
		// The rest of the string may hold a spelling of the password by
		// chance (or a run of the same bytes); then an error quoting the
		// rest is no leak.
		rest := strings.Replace(conn, pwText, "", 1)
		spellings = append(spellings, passwordMarker, url.PathEscape(passwordMarker), strings.ToLower(url.PathEscape(passwordMarker)))
		for _, s := range spellings {
			if strings.Contains(rest, s) {
				return
			}
		}

		cfg, err := ParseConfig(conn)
		if err != nil {
			msg := err.Error()
			for _, s := range spellings {
				if strings.Contains(msg, s) {
					t.Fatalf("ParseConfig(%q): error leaks the password %q (or a piece, %q): %s", conn, pw, s, msg)
				}
			}
		}

		want := new(Config).setParam(name, value)
		_, params, extractErr := extractClusterParams(conn)
		ours := extractErr == nil && len(params) > 0 && params[0] == clusterParam{name, value}
		if want != nil && ours {
			if err == nil {
				t.Fatalf("ParseConfig(%q) accepted %s=%q; setParam says %v", conn, name, value, want)
			}
			if msg := err.Error(); !strings.Contains(msg, name) || !strings.Contains(msg, strconv.Quote(value)) {
				t.Fatalf("ParseConfig(%q) error does not name %s and %q: %s", conn, name, value, msg)
			}
		}
		if err != nil {
			return
		}
		// A password= or service in the rest of the string may legitimately
		// replace ours.
		if !strings.Contains(rest, "password") && !strings.Contains(rest, "%") && !strings.Contains(rest, "service") &&
			cfg.ConnConfig.Password != pw {
			t.Fatalf("ParseConfig(%q): password %q, want %q", conn, cfg.ConnConfig.Password, pw)
		}
		if len(params) != 1 || !ours {
			return
		}
		var c Config
		if err := c.setParam(name, value); err != nil {
			t.Fatalf("ParseConfig(%q) succeeded but %s=%q is invalid: %v", conn, name, value, err)
		}
		got := Config{
			BalanceInterval: cfg.BalanceInterval, ProbeInterval: cfg.ProbeInterval, MaxRetries: cfg.MaxRetries,
			ConnectRate: cfg.ConnectRate, NodeIdentity: cfg.NodeIdentity,
		}
		def := Config{
			BalanceInterval: DefaultBalanceInterval, ProbeInterval: DefaultProbeInterval, MaxRetries: DefaultMaxRetries,
			ConnectRate: DefaultConnectRate, NodeIdentity: NodeIdentityAuto,
		}
		if err := def.setParam(name, value); err != nil {
			t.Fatal(err)
		}
		if got.BalanceInterval != def.BalanceInterval || got.ProbeInterval != def.ProbeInterval ||
			got.MaxRetries != def.MaxRetries || got.NodeIdentity != def.NodeIdentity ||
			got.ConnectRate != def.ConnectRate {
			t.Fatalf("ParseConfig(%q): settings %+v, want %+v", conn, got, def)
		}
	})
}

// plainToken keeps the bytes of s that need no quoting or escaping in either
// connection-string form, so that the value reaches setParam unchanged.
func plainToken(s string) string {
	return strings.Map(func(r rune) rune {
		switch {
		case 'a' <= r && r <= 'z', 'A' <= r && r <= 'Z', '0' <= r && r <= '9', strings.ContainsRune(".+-_:", r):
			return r
		}
		return -1
	}, s)
}

// passwordMarker sits between the bytes of FuzzParseConfig's passwords. It
// is printable, so %q leaves it as it is, and needs no quoting in either
// connection-string form.
const passwordMarker = "\u2603"

// interleave puts sep between the bytes of s.
func interleave(s, sep string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if i > 0 {
			b.WriteString(sep)
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// FuzzClassify builds an error chain from the input (PgErrors with arbitrary
// SQLSTATEs, network and system errors, EOFs, context errors, errors made by
// pgconn, each wrapped by fmt.Errorf with one or several %w, errors.Join, or
// custom Unwrap methods) and checks that Classify never panics, is
// deterministic, returns a defined class, returns ClassCanceled whenever a
// context error is anywhere in the chain, ClassNone only for nil, and the
// same class for the error wrapped once more.
func FuzzClassify(f *testing.F) {
	pgconnErrs := pgconnErrors()
	for _, seed := range [][]byte{
		{},
		{fzPgError, '4', '0', '0', '0', '1'},
		{fzPgError, '4', '0', '0', '0', '3', fzWrap},
		{fzPgError, '5', '7', 'P', '0', '1', fzEOF, fzJoin, 2},
		{fzEOF, fzCanceled, fzJoin, 2, fzWrap},
		{fzPgError, '0', '8', '0', '0', '6', fzDeadline, fzWrapTwo},
		{fzNetOp, fzUnexpectedEOF, fzMulti, 2},
		{fzPgconn, 0, fzPgconn, 1, fzPgconn, 2, fzJoin, 3},
		{fzErrno, byte(syscall.ECONNRESET), fzNetOp, fzWrapper},
		{fzSafe, 1, fzPgError, 'X', 'X', '0', '0', '0', fzWrapTwo},
		{fzText, 'b', 'o', 'o', 'm', fzNil, fzMulti, 2},
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, program []byte) {
		err, hasCtx := buildError(program, pgconnErrs)
		class := Classify(err)
		if again := Classify(err); again != class {
			t.Fatalf("Classify(%v) = %v, then %v", err, class, again)
		}
		if class > ClassAmbiguous || strings.HasPrefix(class.String(), "ErrorClass(") {
			t.Fatalf("Classify(%v) = %v, not a defined class", err, class)
		}
		if (err == nil) != (class == ClassNone) {
			t.Fatalf("Classify(%v) = %v", err, class)
		}
		if hasCtx && !errors.Is(err, context.Canceled) && !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("test bug: errors.Is does not find the context error in %v", err)
		}
		if hasCtx && class != ClassCanceled {
			t.Fatalf("Classify(%v) = %v with a context error in the chain, want canceled", err, class)
		}
		if err == nil {
			return
		}
		for _, wrapped := range []error{
			fmt.Errorf("once more: %w", err),
			errors.Join(err),
			&singleWrapper{err},
		} {
			if got := Classify(wrapped); got != class {
				t.Fatalf("Classify(%v) = %v, but wrapped once more it is %v", err, class, got)
			}
		}
	})
}

// Operations of a FuzzClassify program. Each reads its arguments from the
// bytes after it and pushes an error on a stack; wrapping operations pop
// what they wrap. The program's error is the top of the stack.
const (
	fzPgError       = iota // 5 bytes of SQLSTATE follow
	fzNetOp                // *net.OpError around the top (or a reset)
	fzEOF                  // io.EOF
	fzUnexpectedEOF        // io.ErrUnexpectedEOF
	fzCanceled             // context.Canceled
	fzDeadline             // context.DeadlineExceeded
	fzPgconn               // an error made by pgconn itself; 1 byte picks it
	fzWrap                 // fmt.Errorf("...: %w", top)
	fzWrapTwo              // fmt.Errorf("%w, %w", top, next)
	fzJoin                 // errors.Join of the top n; 1 byte is n
	fzMulti                // a custom Unwrap() []error of the top n; 1 byte is n
	fzWrapper              // a custom Unwrap() error around the top
	fzText                 // errors.New of the following 4 bytes
	fzErrno                // syscall.Errno; 1 byte
	fzSafe                 // an error implementing SafeToRetry; 1 byte says what it returns
	fzTimeout              // a net.Error that timed out
	fzNil                  // nil (in joins and multi-errors)
	fzNilPgError           // a typed nil *pgconn.PgError
	fzNumOps
)

// buildError runs program and reports whether a context error was put
// where errors.Is finds it. Stack depth and list lengths are bounded so the
// fuzzer cannot spend its time building huge chains.
func buildError(program []byte, pgconnErrs []error) (err error, hasCtx bool) {
	type entry struct {
		err    error
		hasCtx bool
	}
	var stack []entry
	push := func(err error, hasCtx bool) { stack = append(stack, entry{err, hasCtx}) }
	pop := func() entry {
		if len(stack) == 0 {
			return entry{}
		}
		e := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		return e
	}
	arg := func() byte {
		if len(program) == 0 {
			return 0
		}
		b := program[0]
		program = program[1:]
		return b
	}
	for len(program) > 0 && len(stack) < 64 {
		switch op := arg() % fzNumOps; op {
		case fzPgError:
			code := make([]byte, 5)
			for i := range code {
				code[i] = arg()
			}
			push(&pgconn.PgError{Severity: "ERROR", Code: string(code), Message: "m"}, false)
		case fzNetOp:
			inner := pop()
			if inner.err == nil {
				inner.err = os.NewSyscallError("read", syscall.ECONNRESET)
			}
			push(&net.OpError{Op: "read", Net: "tcp", Err: inner.err}, inner.hasCtx)
		case fzNilPgError:
			push((*pgconn.PgError)(nil), false)
		case fzEOF:
			push(io.EOF, false)
		case fzUnexpectedEOF:
			push(io.ErrUnexpectedEOF, false)
		case fzCanceled:
			push(context.Canceled, true)
		case fzDeadline:
			push(context.DeadlineExceeded, true)
		case fzPgconn:
			i := int(arg()) % len(pgconnErrs)
			push(pgconnErrs[i], errors.Is(pgconnErrs[i], context.Canceled) || errors.Is(pgconnErrs[i], context.DeadlineExceeded))
		case fzWrap:
			e := pop()
			if e.err == nil {
				push(nil, false) // fmt.Errorf("%w", nil) is not a wrapper of anything
				continue
			}
			push(fmt.Errorf("query: %w", e.err), e.hasCtx)
		case fzWrapTwo:
			a, b := pop(), pop()
			if a.err == nil || b.err == nil {
				push(a.err, a.hasCtx)
				continue
			}
			push(fmt.Errorf("%w, then %w", a.err, b.err), a.hasCtx || b.hasCtx)
		case fzJoin, fzMulti:
			n := int(arg()) % 5
			errs := make([]error, 0, n)
			has := false
			for range n {
				e := pop()
				errs = append(errs, e.err)
				has = has || e.hasCtx
			}
			if op == fzJoin {
				push(errors.Join(errs...), has)
			} else {
				push(&multiWrapper{errs}, has)
			}
		case fzWrapper:
			e := pop()
			push(&singleWrapper{e.err}, e.hasCtx)
		case fzText:
			text := make([]byte, 4)
			for i := range text {
				text[i] = arg()
			}
			push(errors.New(string(text)), false)
		case fzErrno:
			push(syscall.Errno(arg()), false)
		case fzSafe:
			push(safeToRetryError{arg()%2 == 0}, false)
		case fzTimeout:
			push(timeoutError{}, false)
		case fzNil:
			push(nil, false)
		}
	}
	e := pop()
	return e.err, e.hasCtx
}

// singleWrapper and multiWrapper wrap errors the way packages other than
// fmt and errors do. multiWrapper may hold nil errors.
type singleWrapper struct{ err error }

func (w *singleWrapper) Error() string { return "wrapped: " + fmt.Sprint(w.err) }
func (w *singleWrapper) Unwrap() error { return w.err }

type multiWrapper struct{ errs []error }

func (w *multiWrapper) Error() string   { return fmt.Sprint("multi: ", w.errs) }
func (w *multiWrapper) Unwrap() []error { return w.errs }

type safeToRetryError struct{ safe bool }

func (e safeToRetryError) Error() string     { return "safe to retry: " + strconv.FormatBool(e.safe) }
func (e safeToRetryError) SafeToRetry() bool { return e.safe }

// pgconnErrors returns errors that pgconn itself made: a refused connect, a
// connect under a canceled context and under an expired deadline, a parse
// error, and a closed connection. They carry pgconn's unexported types
// (ConnectError around perDialConnectError, contextAlreadyDoneError,
// errTimeout...), which Classify must see through.
func pgconnErrors() []error {
	errs := []error{pgconn.ErrConnClosed, pgconn.NewParseConfigError("host=h", "invalid port", nil)}
	// Port 1 on the loopback interface refuses at once.
	const refused = "postgres://u@127.0.0.1:1/db?sslmode=disable&connect_timeout=5"
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := pgconn.Connect(ctx, refused); err != nil {
		errs = append(errs, err)
	}
	canceled, cancelNow := context.WithCancel(context.Background())
	cancelNow()
	if _, err := pgconn.Connect(canceled, refused); err != nil {
		errs = append(errs, err)
	}
	expired, cancelExpired := context.WithDeadline(context.Background(), time.Unix(0, 0))
	defer cancelExpired()
	if _, err := pgconn.Connect(expired, refused); err != nil {
		errs = append(errs, err)
	}
	return errs
}
