package fakepg

import (
	"context"
	"errors"
	"net"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"
)

// session is one client connection after startup.
type session struct {
	srv    *Server
	conn   net.Conn
	be     *pgproto3.Backend
	pid    uint32
	secret [4]byte

	tx   byte     // transaction status for ReadyForQuery: 'I', 'T' or 'E'
	undo []undoOp // how to roll back the writes of the open transaction

	stmts   map[string]*prepared
	portals map[string]*portal

	// runMu protects runCancel, which cancels the statement running now (nil
	// when idle); a CancelRequest arrives on another connection's goroutine.
	runMu     sync.Mutex
	runCancel context.CancelFunc
}

type prepared struct {
	plan      *plan
	paramOIDs []uint32
}

type portal struct {
	stmt          *prepared
	args          []any
	resultFormats []int16
}

// sqlError is an error with a SQLSTATE, sent to the client as an ErrorResponse.
type sqlError struct {
	severity string
	code     string
	msg      string
}

func (e *sqlError) Error() string { return e.code + ": " + e.msg }

func errorf(code, msg string) *sqlError { return &sqlError{severity: "ERROR", code: code, msg: msg} }

var (
	errCanceled = errorf("57014", "canceling statement due to user request")
	errShutdown = &sqlError{severity: "FATAL", code: "57P01", msg: "terminating connection due to administrator command"}
)

func serveConn(srv *Server, c net.Conn) {
	be := pgproto3.NewBackend(c, c)
	for {
		msg, err := be.ReceiveStartupMessage()
		if err != nil {
			return
		}
		switch m := msg.(type) {
		case *pgproto3.SSLRequest, *pgproto3.GSSEncRequest:
			// No TLS or GSS: the client goes on in plain text, as with a
			// PostgreSQL server configured without them.
			if _, err := c.Write([]byte{'N'}); err != nil {
				return
			}
			continue
		case *pgproto3.CancelRequest:
			srv.cancelRequest(m.ProcessID, m.SecretKey)
			return
		case *pgproto3.StartupMessage:
			sess := &session{
				srv: srv, conn: c, be: be, tx: 'I',
				stmts:   make(map[string]*prepared),
				portals: make(map[string]*portal),
			}
			srv.register(sess)
			defer srv.unregister(sess)
			if err := sess.startup(m); err != nil {
				return
			}
			sess.loop()
			return
		default:
			return
		}
	}
}

func (s *session) startup(m *pgproto3.StartupMessage) error {
	if m.ProtocolVersion != pgproto3.ProtocolVersion30 {
		// PostgreSQL 15 speaks 3.0 only and says so.
		s.be.Send(&pgproto3.NegotiateProtocolVersion{NewestMinorProtocol: 0})
	}
	s.be.Send(&pgproto3.AuthenticationOk{})
	for _, p := range [][2]string{
		{"server_version", "15.0"},
		{"server_encoding", "UTF8"},
		{"client_encoding", "UTF8"},
		{"DateStyle", "ISO, MDY"},
		{"integer_datetimes", "on"},
		{"standard_conforming_strings", "on"},
		{"TimeZone", "UTC"},
		{"application_name", m.Parameters["application_name"]},
	} {
		s.be.Send(&pgproto3.ParameterStatus{Name: p[0], Value: p[1]})
	}
	s.be.Send(&pgproto3.BackendKeyData{ProcessID: s.pid, SecretKey: s.secret[:]})
	s.be.Send(&pgproto3.ReadyForQuery{TxStatus: s.tx})
	return s.be.Flush()
}

func (s *session) loop() {
	// After an error in the extended protocol, PostgreSQL skips messages
	// until the next Sync.
	skipToSync := false
	for {
		msg, err := s.be.Receive()
		if err != nil {
			return
		}
		if skipToSync {
			switch msg.(type) {
			case *pgproto3.Sync:
				skipToSync = false
			case *pgproto3.Terminate:
				return
			default:
				continue
			}
		}
		var qerr error
		switch m := msg.(type) {
		case *pgproto3.Query:
			qerr = s.simpleQuery(m.String)
			s.be.Send(&pgproto3.ReadyForQuery{TxStatus: s.tx})
			if err := s.be.Flush(); err != nil {
				return
			}
		case *pgproto3.Parse:
			qerr = s.parse(m)
		case *pgproto3.Bind:
			qerr = s.bind(m)
		case *pgproto3.Describe:
			qerr = s.describe(m)
		case *pgproto3.Execute:
			qerr = s.execute(m)
		case *pgproto3.Close:
			if m.ObjectType == 'S' {
				delete(s.stmts, m.Name)
			} else {
				delete(s.portals, m.Name)
			}
			s.be.Send(&pgproto3.CloseComplete{})
		case *pgproto3.Sync:
			delete(s.portals, "") // the unnamed portal ends with the implicit transaction
			s.be.Send(&pgproto3.ReadyForQuery{TxStatus: s.tx})
			if err := s.be.Flush(); err != nil {
				return
			}
		case *pgproto3.Flush:
			if err := s.be.Flush(); err != nil {
				return
			}
		case *pgproto3.Terminate:
			return
		default:
			qerr = errorf("0A000", "fakepg: protocol message not supported")
		}
		if qerr != nil {
			if _, isQuery := msg.(*pgproto3.Query); !isQuery {
				s.sendError(qerr)
				skipToSync = true
			}
			var se *sqlError
			if errors.As(qerr, &se) && se.severity == "FATAL" {
				s.be.Flush()
				return
			}
		}
	}
}

func (s *session) sendError(err error) {
	var se *sqlError
	if !errors.As(err, &se) {
		se = errorf("XX000", err.Error())
	}
	if s.tx == 'T' {
		s.tx = 'E'
	}
	s.be.Send(&pgproto3.ErrorResponse{
		Severity:            se.severity,
		SeverityUnlocalized: se.severity,
		Code:                se.code,
		Message:             se.msg,
	})
}

// simpleQuery runs every statement of a Query message; the first error
// stops it. The returned error has already been sent.
func (s *session) simpleQuery(sql string) error {
	stmts, err := splitStatements(sql)
	if err != nil {
		s.sendError(err)
		return err
	}
	if len(stmts) == 0 {
		s.be.Send(&pgproto3.EmptyQueryResponse{})
		return nil
	}
	for _, toks := range stmts {
		p, err := s.srv.planTokens(toks)
		if err == nil && p.numParams > 0 {
			err = errorf("42P02", "there is no parameter $1")
		}
		if err != nil {
			s.sendError(err)
			return err
		}
		if err := s.checkTxState(p); err != nil {
			s.sendError(err)
			return err
		}
		rows, tag, err := s.run(p, nil)
		if err != nil {
			s.sendError(err)
			return err
		}
		if p.cols != nil {
			s.be.Send(rowDescription(p.cols, nil))
		}
		if err := s.sendRows(p.cols, rows, nil); err != nil {
			s.sendError(err)
			return err
		}
		s.be.Send(&pgproto3.CommandComplete{CommandTag: []byte(tag)})
	}
	return nil
}

func (s *session) parse(m *pgproto3.Parse) error {
	stmts, err := splitStatements(m.Query)
	if err != nil {
		return err
	}
	if len(stmts) > 1 {
		return errorf("42601", "cannot insert multiple commands into a prepared statement")
	}
	var p *plan
	if len(stmts) == 0 {
		p = &plan{kind: kindEmpty}
	} else if p, err = s.srv.planTokens(stmts[0]); err != nil {
		return err
	}
	oids := make([]uint32, max(p.numParams, len(m.ParameterOIDs)))
	for i := range oids {
		if i < len(m.ParameterOIDs) && m.ParameterOIDs[i] != 0 {
			oids[i] = m.ParameterOIDs[i]
		} else if i < len(p.paramOIDs) {
			oids[i] = p.paramOIDs[i]
		}
		if oids[i] == 0 {
			oids[i] = oidText
		}
	}
	if m.Name != "" {
		if _, ok := s.stmts[m.Name]; ok {
			return errorf("42P05", "prepared statement \""+m.Name+"\" already exists")
		}
	}
	s.stmts[m.Name] = &prepared{plan: p, paramOIDs: oids}
	s.be.Send(&pgproto3.ParseComplete{})
	return nil
}

func (s *session) bind(m *pgproto3.Bind) error {
	st := s.stmts[m.PreparedStatement]
	if st == nil {
		return errorf("26000", "prepared statement \""+m.PreparedStatement+"\" does not exist")
	}
	if len(m.Parameters) != len(st.paramOIDs) {
		return errorf("08P01", "bind message supplies a wrong number of parameters")
	}
	args := make([]any, len(m.Parameters))
	for i, raw := range m.Parameters {
		format := int16(0)
		switch len(m.ParameterFormatCodes) {
		case 0:
		case 1:
			format = m.ParameterFormatCodes[0]
		default:
			format = m.ParameterFormatCodes[i]
		}
		v, err := decodeParam(raw, format, st.paramOIDs[i])
		if err != nil {
			return err
		}
		args[i] = v
	}
	s.portals[m.DestinationPortal] = &portal{
		stmt:          st,
		args:          args,
		resultFormats: append([]int16(nil), m.ResultFormatCodes...),
	}
	s.be.Send(&pgproto3.BindComplete{})
	return nil
}

func (s *session) describe(m *pgproto3.Describe) error {
	if m.ObjectType == 'S' {
		st := s.stmts[m.Name]
		if st == nil {
			return errorf("26000", "prepared statement \""+m.Name+"\" does not exist")
		}
		s.be.Send(&pgproto3.ParameterDescription{ParameterOIDs: st.paramOIDs})
		if st.plan.cols == nil {
			s.be.Send(&pgproto3.NoData{})
		} else {
			s.be.Send(rowDescription(st.plan.cols, nil))
		}
		return nil
	}
	pt := s.portals[m.Name]
	if pt == nil {
		return errorf("34000", "portal \""+m.Name+"\" does not exist")
	}
	if pt.stmt.plan.cols == nil {
		s.be.Send(&pgproto3.NoData{})
	} else {
		s.be.Send(rowDescription(pt.stmt.plan.cols, pt.resultFormats))
	}
	return nil
}

func (s *session) execute(m *pgproto3.Execute) error {
	pt := s.portals[m.Portal]
	if pt == nil {
		return errorf("34000", "portal \""+m.Portal+"\" does not exist")
	}
	p := pt.stmt.plan
	if p.kind == kindEmpty {
		s.be.Send(&pgproto3.EmptyQueryResponse{})
		return nil
	}
	if err := s.checkTxState(p); err != nil {
		return err
	}
	rows, tag, err := s.run(p, pt.args)
	if err != nil {
		return err
	}
	if err := s.sendRows(p.cols, rows, pt.resultFormats); err != nil {
		return err
	}
	s.be.Send(&pgproto3.CommandComplete{CommandTag: []byte(tag)})
	return nil
}

func (s *session) checkTxState(p *plan) error {
	if s.tx == 'E' && p.kind != kindCommit && p.kind != kindRollback {
		return errorf("25P02", "current transaction is aborted, commands ignored until end of transaction block")
	}
	return nil
}

// run executes p with a context that a CancelRequest or Close cancels.
func (s *session) run(p *plan, args []any) ([][]any, string, error) {
	ctx, cancel := context.WithCancel(s.srv.ctx)
	s.runMu.Lock()
	s.runCancel = cancel
	s.runMu.Unlock()
	defer func() {
		s.runMu.Lock()
		s.runCancel = nil
		s.runMu.Unlock()
		cancel()
	}()
	return p.exec(ctx, s, args)
}

func (s *session) cancelRunning() {
	s.runMu.Lock()
	defer s.runMu.Unlock()
	if s.runCancel != nil {
		s.runCancel()
	}
}

// sleep waits d unless the statement is cancelled (57014) or the server
// closes (57P01, which also ends the connection).
func (s *session) sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		if s.srv.ctx.Err() != nil {
			return errShutdown
		}
		return errCanceled
	}
}

func (s *session) sendRows(cols []column, rows [][]any, formats []int16) error {
	for _, row := range rows {
		values := make([][]byte, len(row))
		for i, v := range row {
			b, err := encodeValue(v, cols[i].oid, formatFor(formats, i))
			if err != nil {
				return err
			}
			values[i] = b
		}
		s.be.Send(&pgproto3.DataRow{Values: values})
	}
	return nil
}

func formatFor(formats []int16, i int) int16 {
	switch len(formats) {
	case 0:
		return 0
	case 1:
		return formats[0]
	default:
		if i < len(formats) {
			return formats[i]
		}
		return 0
	}
}

func rowDescription(cols []column, formats []int16) *pgproto3.RowDescription {
	fields := make([]pgproto3.FieldDescription, len(cols))
	for i, c := range cols {
		fields[i] = pgproto3.FieldDescription{
			Name:         []byte(c.name),
			DataTypeOID:  c.oid,
			DataTypeSize: typeSize(c.oid),
			TypeModifier: -1,
			Format:       formatFor(formats, i),
		}
	}
	return &pgproto3.RowDescription{Fields: fields}
}

// localAddr is the server side of the connection, for inet_server_addr().
func (s *session) localAddr() (ip net.IP, port int) {
	if a, ok := s.conn.LocalAddr().(*net.TCPAddr); ok {
		return a.IP, a.Port
	}
	return net.IPv4(127, 0, 0, 1), 0
}
