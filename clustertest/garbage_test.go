package clustertest

import (
	"encoding/binary"
	"io"
	"math/rand/v2"
	"net"
	"testing"
	"time"
)

// TestGarbage sends malformed packets to a node proxy and to the load
// balancer: each connection must simply be closed, and nothing may panic or
// stay counted.
func TestGarbage(t *testing.T) {
	c := New(t, Options{Nodes: 1, InProcess: true})
	n := c.Node(1)
	startup := func(version uint32, body ...byte) []byte {
		b := binary.BigEndian.AppendUint32(nil, uint32(8+len(body)))
		b = binary.BigEndian.AppendUint32(b, version)
		return append(b, body...)
	}
	valid := startup(196608, []byte("user\x00postgres\x00\x00")...)
	rng := rand.New(rand.NewPCG(1, 2))
	random := make([]byte, 300)
	for i := range random {
		random[i] = byte(rng.UintN(256))
	}
	cases := map[string][]byte{
		"length too small":      {0, 0, 0, 4, 0, 0, 0, 0},
		"length too large":      {0, 1, 0, 0, 0, 3, 0, 0},
		"short cancel request":  startup(cancelRequestCode),
		"unknown cancel key":    startup(cancelRequestCode, 1, 2, 3, 4, 5, 6, 7, 8),
		"message length < 4":    append(append([]byte{}, valid...), 'Q', 0, 0, 0, 1),
		"message length absurd": append(append([]byte{}, valid...), 'Q', 0x7f, 0xff, 0xff, 0xff),
		"random bytes":          random,
	}
	for name, payload := range cases {
		for _, addr := range []string{n.Addr(), c.lb.addr()} {
			conn, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			conn.Write(payload)
			conn.SetReadDeadline(time.Now().Add(20 * time.Second))
			// Whatever the proxy answers first, it must then close.
			if _, err := io.Copy(io.Discard, conn); err != nil {
				t.Errorf("%s via %s: not closed: %v", name, addr, err)
			}
			conn.Close()
		}
	}
	eventually(t, "no open connections", func() bool { return n.OpenConns() == 0 })
}
