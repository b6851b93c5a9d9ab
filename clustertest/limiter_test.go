package clustertest

import (
	"testing"
	"testing/synctest"
)

func TestLimiter(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l := newLimiter()
		l.setMax(1)
		if !l.acquire(nil) {
			t.Fatal("first acquire failed")
		}
		got := make(chan bool, 2)
		go func() { got <- l.acquire(nil) }()
		synctest.Wait()
		if len(got) != 0 {
			t.Fatal("second acquire did not wait at capacity 1")
		}
		l.setMax(2) // a higher cap lets it in at once
		synctest.Wait()
		if len(got) != 1 || !<-got {
			t.Fatal("raising the cap did not admit the waiter")
		}

		done := make(chan struct{})
		go func() { got <- l.acquire(done) }()
		synctest.Wait()
		close(done) // the connection closed while queued
		synctest.Wait()
		if ok := <-got; ok {
			t.Fatal("acquire succeeded after done")
		}

		go func() { got <- l.acquire(nil) }()
		synctest.Wait()
		l.release()
		synctest.Wait()
		if len(got) != 1 || !<-got {
			t.Fatal("release did not admit the waiter")
		}
		l.setMax(0) // unlimited
		for range 10 {
			if !l.acquire(nil) {
				t.Fatal("acquire failed while unlimited")
			}
		}
		if inFlight, peak := l.stats(); inFlight != 12 || peak != 12 {
			t.Fatalf("in flight %d, peak %d; want 12, 12", inFlight, peak)
		}
	})
}
