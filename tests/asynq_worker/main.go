// Command asynq_worker is a tiny real asynq program the Python tests build and drive, so that
// the exporter's asynq preset is tested against the keys asynq itself writes, never hand-typed
// ones. See tests/asynq_app.py for the Python side.
//
//	asynq_worker enqueue -redis HOST:PORT [-db N] -queue Q -type T [-n N] [-in DUR] [-retry R] [-payload S]
//	asynq_worker work    -redis HOST:PORT [-db N] -queues q1,q2 [-concurrency N]
//	asynq_worker pause   -redis HOST:PORT [-db N] -queue Q
//	asynq_worker unpause -redis HOST:PORT [-db N] -queue Q
//
// Every subcommand also takes -username and -password.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/hibiken/asynq"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	cmd, args := os.Args[1], os.Args[2:]
	var err error
	switch cmd {
	case "enqueue":
		err = enqueue(args)
	case "work":
		err = work(args)
	case "pause", "unpause":
		err = pause(cmd, args)
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "asynq_worker %s: %v\n", cmd, err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: asynq_worker enqueue|work|pause|unpause -redis HOST:PORT [-db N] ...")
	os.Exit(2)
}

// newFlags returns a flag set carrying the connection flags every subcommand shares.
func newFlags(name string) (*flag.FlagSet, *asynq.RedisClientOpt) {
	fs := flag.NewFlagSet(name, flag.ExitOnError)
	opt := &asynq.RedisClientOpt{}
	fs.StringVar(&opt.Addr, "redis", "127.0.0.1:6379", "Redis address, host:port")
	fs.IntVar(&opt.DB, "db", 0, "Redis database number")
	// optional, for a test server given as a redis:// URL with credentials
	fs.StringVar(&opt.Username, "username", "", "Redis ACL user name")
	fs.StringVar(&opt.Password, "password", "", "Redis password")
	return fs, opt
}

func enqueue(args []string) error {
	fs, redisOpt := newFlags("enqueue")
	queue := fs.String("queue", "default", "queue to enqueue into")
	taskType := fs.String("type", "ok", "task type (selects the handler: ok, fail, skip, retry_later, block)")
	n := fs.Int("n", 1, "number of tasks")
	in := fs.Duration("in", 0, "schedule the tasks this far in the future (asynq.ProcessIn)")
	// -1 means "not given": asynq's own default MaxRetry (25) then applies.
	retry := fs.Int("retry", -1, "asynq.MaxRetry for the tasks")
	payload := fs.String("payload", "", "task payload (for block: the path of the file that releases it)")
	fs.Parse(args)

	opts := []asynq.Option{asynq.Queue(*queue)}
	if *in > 0 {
		opts = append(opts, asynq.ProcessIn(*in))
	}
	if *retry >= 0 {
		opts = append(opts, asynq.MaxRetry(*retry))
	}

	client := asynq.NewClient(*redisOpt)
	defer client.Close()
	for i := 0; i < *n; i++ {
		info, err := client.Enqueue(asynq.NewTask(*taskType, []byte(*payload)), opts...)
		if err != nil {
			return err
		}
		fmt.Println(info.ID)
	}
	return nil
}

func work(args []string) error {
	fs, redisOpt := newFlags("work")
	queues := fs.String("queues", "default", "comma-separated queues to serve, equal priority")
	concurrency := fs.Int("concurrency", 4, "number of concurrent workers")
	fs.Parse(args)

	weights := map[string]int{}
	for _, q := range strings.Split(*queues, ",") {
		if q = strings.TrimSpace(q); q != "" {
			weights[q] = 1
		}
	}

	srv := asynq.NewServer(*redisOpt, asynq.Config{
		Concurrency: *concurrency,
		Queues:      weights,
		// Tests stop the worker with SIGTERM; don't let a blocked task hold that up for 8 s.
		ShutdownTimeout: time.Second,
		// Short polling intervals so a test's retries and scheduled tasks move promptly.
		TaskCheckInterval:        100 * time.Millisecond,
		DelayedTaskCheckInterval: time.Second,
		RetryDelayFunc: func(n int, err error, t *asynq.Task) time.Duration {
			if t.Type() == "retry_later" {
				// parks the task in the retry set for the length of any test
				return time.Hour
			}
			// retry at once (asynq's default backoff starts at ~15 s, too slow for a test)
			return 0
		},
		// The Python side reads only stdout; keep asynq's log on stderr and quiet.
		LogLevel: asynq.WarnLevel,
	})

	if err := srv.Start(asynq.HandlerFunc(handle)); err != nil {
		return err
	}
	// Start does not touch Redis; fail loudly here rather than print "ready" to a dead server.
	if err := srv.Ping(); err != nil {
		srv.Shutdown()
		return err
	}
	fmt.Println("ready")

	// asynq's Run also waits for signals, but also stops on SIGTSTP; handle just the two we use.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	<-sigs
	srv.Shutdown()
	return nil
}

// handle picks the behaviour by task type. (A plain switch rather than asynq.ServeMux, whose
// fallback fails unknown types with "handler not found"; here any other type succeeds.)
func handle(ctx context.Context, t *asynq.Task) error {
	switch t.Type() {
	case "fail":
		return errors.New("fails on purpose") // retried up to MaxRetry, then archived
	case "skip":
		return fmt.Errorf("fails, not worth retrying: %w", asynq.SkipRetry) // archived at once
	case "retry_later":
		return errors.New("fails; RetryDelayFunc parks it in the retry set for an hour")
	case "block":
		return block(ctx, t)
	default: // "ok" and anything else
		return nil
	}
}

// block runs until its context is cancelled (shutdown) or the file named by its payload exists,
// so a test can hold a task in "active" (and SIGKILL the worker there, leaving its lease behind).
func block(ctx context.Context, t *asynq.Task) error {
	path := string(t.Payload())
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		if path != "" {
			if _, err := os.Stat(path); err == nil {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		}
	}
}

func pause(cmd string, args []string) error {
	fs, redisOpt := newFlags(cmd)
	queue := fs.String("queue", "default", "queue to pause or unpause")
	fs.Parse(args)

	inspector := asynq.NewInspector(*redisOpt)
	defer inspector.Close()
	if cmd == "pause" {
		return inspector.PauseQueue(*queue)
	}
	return inspector.UnpauseQueue(*queue)
}
