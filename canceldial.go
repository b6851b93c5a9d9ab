package clusterpool

import (
	"context"
	"net"
	"sync"

	"github.com/jackc/pgx/v5"
)

// bindCancelDials makes pgx's cleanup of a cut connection end when the pool
// closes. When a call's context cuts a connection mid-read, pgx closes it
// in the background (PgConn.asyncClose): it dials a new connection for a
// CancelRequest, then drains the old one, bounded by a fixed 15 s deadline.
// pgxpool's destructor waits for that, and its Close for the destructors,
// so on a node that holds sockets without answering (a partition) Close
// would take 15 s. A dial after the connection was established is that
// CancelRequest: from then on, the pool's Close ends the dial and closes
// both sockets. A user BeforeConnect that replaces DialFunc (it runs after
// the pool's hook) bypasses this, and Close then waits for pgx as pgxpool's
// does.
//
// It returns the function ValidateConnect calls once the connection is
// established (chainValidateConnect), or nil when cc has no DialFunc.
func (p *Pool) bindCancelDials(cc *pgx.ConnConfig) (established func()) {
	dial := cc.DialFunc
	if dial == nil {
		return nil
	}
	var (
		mu        sync.Mutex
		main      []net.Conn // the connection's sockets (fallbacks too)
		connected bool
		stopMain  func() bool
	)
	cc.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
		mu.Lock()
		if !connected {
			mu.Unlock()
			c, err := dial(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			mu.Lock()
			main = append(main, c)
			mu.Unlock()
			return &hookedConn{Conn: c, onClose: func() {
				mu.Lock()
				stop := stopMain
				mu.Unlock()
				if stop != nil {
					stop()
				}
			}}, nil
		}
		// The CancelRequest of asyncClose: the connection is dead.
		if stopMain == nil {
			sockets := main
			stopMain = context.AfterFunc(p.bgCtx, func() {
				for _, s := range sockets {
					s.Close()
				}
			})
		}
		mu.Unlock()
		dctx, cancel := context.WithCancel(ctx)
		stopDial := context.AfterFunc(p.bgCtx, cancel)
		c, err := dial(dctx, network, addr)
		stopDial()
		if err != nil {
			cancel()
			return nil, err
		}
		stop := context.AfterFunc(p.bgCtx, func() { c.Close() })
		return &hookedConn{Conn: c, onClose: func() { stop(); cancel() }}, nil
	}
	return func() {
		mu.Lock()
		connected = true
		mu.Unlock()
	}
}

// hookedConn calls onClose once, when it is closed.
type hookedConn struct {
	net.Conn
	once    sync.Once
	onClose func()
}

func (c *hookedConn) Close() error {
	c.once.Do(c.onClose)
	return c.Conn.Close()
}
