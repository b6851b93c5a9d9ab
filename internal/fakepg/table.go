package fakepg

// table is an in-memory table keyed by one column. Rows are held by the
// text form of their key.
type table struct {
	name string
	cols []column
	key  int // index of the key column in cols
	rows map[string][]any
}

func (t *table) colIndex(name string) int {
	for i, c := range t.cols {
		if c.name == name {
			return i
		}
	}
	return -1
}

func undefinedTable(name string) error {
	return errorf("42P01", "relation \""+name+"\" does not exist")
}

func undefinedColumn(name string) error {
	return errorf("42703", "column \""+name+"\" does not exist")
}

// tableDef returns a copy of the table's definition (without rows), for planning.
func (srv *Server) tableDef(name string) (*table, error) {
	srv.dataMu.Lock()
	defer srv.dataMu.Unlock()
	t := srv.tables[name]
	if t == nil {
		return nil, undefinedTable(name)
	}
	return &table{name: t.name, cols: t.cols, key: t.key}, nil
}

// undoOp restores one row as it was before a write inside a transaction.
type undoOp struct {
	t   *table
	key string
	row []any // nil: the row did not exist
}

// writeLocked sets (or, with a nil row, deletes) a row and, inside a
// transaction, remembers how to undo it. srv.dataMu must be held.
func (s *session) writeLocked(t *table, key string, row []any) {
	if s.tx == 'T' {
		s.undo = append(s.undo, undoOp{t: t, key: key, row: t.rows[key]})
	}
	if row == nil {
		delete(t.rows, key)
	} else {
		t.rows[key] = row
	}
}

// rollback undoes the open transaction's writes, newest first. There is no
// isolation: other sessions may have seen them in the meantime.
func (s *session) rollback() {
	s.srv.dataMu.Lock()
	for i := len(s.undo) - 1; i >= 0; i-- {
		u := s.undo[i]
		if u.row == nil {
			delete(u.t.rows, u.key)
		} else {
			u.t.rows[u.key] = u.row
		}
	}
	s.srv.dataMu.Unlock()
	s.undo = s.undo[:0]
	s.tx = 'I'
}
